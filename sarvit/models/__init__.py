"""Architectures that timm lacks, one module each, written from their papers.

Importing this package registers every model below with timm (``timm.create_model``,
``timm.list_models``); ``import sarvit`` arranges that as soon as timm is imported.
"""

# one import per architecture module; each registers its models with timm
from . import cvt  # noqa: F401  CvT-13 (Wu et al., 2021)
from . import pvt  # noqa: F401  PVT v1: pvt_tiny, pvt_small (Wang et al., 2021)
from . import t2t_vit  # noqa: F401  T2T-ViT: t2t_vit_14, t2t_vit_t_14 (Yuan et al., 2021)
