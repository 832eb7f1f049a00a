"""sarvit: SAR, the spatial-entropy regulariser for vision transformers.

    import timm, sarvit
    model = sarvit.attach(timm.create_model("vit_small_patch16_224", num_classes=100))
    logits, S = model.forward_with_similarity(images)        # S: (B, heads, 14, 14)
    loss = ce(logits, targets) + 0.01 * sarvit.SpatialEntropyLoss()(S)
"""

from .components import connected_components
from .entropy import SpatialEntropyLoss, spatial_entropy
from .factory import create_model, load_model
from .surgery import BlockLayout, attach, detach, is_attached

__version__ = "0.1.0"

__all__ = [
    "connected_components",
    "spatial_entropy",
    "SpatialEntropyLoss",
    "attach",
    "detach",
    "is_attached",
    "BlockLayout",
    "create_model",
    "load_model",
]
