"""Attention analysis: per-head maps of the last block, and figures of them."""

from .attention import cls_attention_maps, plot_attention_grid

__all__ = ["cls_attention_maps", "plot_attention_grid"]
