"""What SAR does to the last block's attention, for every model family: maps, masks, Jaccard
scores, figures and curves.

    maps = sarvit.analysis.attention_maps(model, images)   # .attn, .S: (B, heads, h, w)
    keep = maps.mass_mask(0.6)                              # DINO's 60%-mass rule
    score = sarvit.analysis.jaccard(maps.attn[0], mask, stride=maps.stride)

Modules: ``maps`` (arrays from a model), ``scoring`` (pure Jaccard functions),
``protocol`` (Table 11 over a dataset), ``models`` (loading weights at any size),
``figures`` (drawing arrays), ``gallery`` (the ``sarvit attention`` figure), ``curves``
(``curves.png`` of a run).
"""

from .attention import cls_attention_maps, plot_attention_grid
from .curves import plot_curves, write_curves
from .figures import ModelMaps, plot_attention_figure
from .gallery import attention_figure
from .maps import AttentionMaps, attention_maps, mass_mask, similarity_components
from .models import load_analysis_model
from .protocol import run_jaccard, score_dataset, write_scores
from .scoring import ImageScore, JaccardSummary, jaccard, object_ious, summarise

__all__ = [
    "attention_maps", "AttentionMaps", "mass_mask", "similarity_components",
    "jaccard", "object_ious", "ImageScore", "JaccardSummary", "summarise",
    "run_jaccard", "score_dataset", "write_scores", "load_analysis_model",
    "plot_attention_figure", "ModelMaps", "attention_figure", "plot_curves", "write_curves",
    "cls_attention_maps", "plot_attention_grid",
]
