"""Per-head attention maps of the last block and a figure comparing models.

``cls_attention_maps`` returns, for every head, the [CLS] query's attention over the
patch grid: the softmax of the similarity maps ``S`` of Eq. 4 over the patches (the
maps Fig. 4 of the paper shows, without the [CLS] key's own share).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..entropy import spatial_entropy

__all__ = ["cls_attention_maps", "plot_attention_grid"]


@torch.no_grad()
def cls_attention_maps(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images (B, 3, H, W)`` -> ``(A, S)``, both ``(B, heads, h, w)`` float32.

    ``A`` sums to 1 over each head's grid; ``S`` is the pre-softmax similarity (Eq. 4).
    """
    was_training = model.training
    model.eval()
    _, S = model.forward_with_similarity(images)
    model.train(was_training)
    A = torch.softmax(S.flatten(-2), dim=-1).reshape(S.shape)
    return A, S


def plot_attention_grid(
    images: torch.Tensor,
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    captions: list[str] | None = None,
) -> Path:
    """One row per image: the image, then every head of every model, each titled with the
    head's spatial entropy and number of components.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1] for display.
        maps: model name -> ``(A, S)`` from :func:`cls_attention_maps`.
        path: where the PNG goes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(maps)
    heads = maps[names[0]][0].shape[1]
    rows, cols = images.shape[0], 1 + heads * len(names)
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols, 1.55 * rows), squeeze=False)
    for r in range(rows):
        ax = axes[r, 0]
        ax.imshow(images[r].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        ax.set_title(captions[r] if captions else "input", fontsize=7)
        for m, name in enumerate(names):
            A, S = maps[name]
            H, count = spatial_entropy(S[r], return_num_components=True)  # (heads,)
            for h in range(heads):
                ax = axes[r, 1 + m * heads + h]
                ax.imshow(A[r, h].cpu().numpy(), cmap="inferno")
                ax.set_title(f"{name} h{h + 1}\nSE {H[h]:.2f}, {int(count[h])} comp.", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("[CLS] attention over the patch grid, last block, per head", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
