"""The ViTDet adapter: the last map of patch tokens, the simple feature pyramid's shapes and strides."""

import pytest
import timm
import torch

from sarvit.dense.backbone import SimpleFeaturePyramid, ViTDetBackbone
from sarvit.dense.detection import anchor_sizes, build_detector
from sarvit.errors import ConfigError, UnsupportedModel
from sarvit.factory import create_model
from sarvit.surgery.block import SARBlock

TINY = {"patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def tiny_vit(layout="C", **changes):
    torch.manual_seed(0)
    return create_model("vit_tiny_patch16_224", 0, img_size=16, model_kwargs={**TINY, **changes}, layout=layout)


@pytest.mark.parametrize("size", [32, 40])
def test_pyramid_levels_have_strides_p_over_4_to_2p(size):
    backbone = ViTDetBackbone(tiny_vit(), 32, out_channels=8).eval()
    levels = backbone(torch.randn(2, 3, size, size))
    assert list(levels) == ["0", "1", "2", "3"] and backbone.out_channels == 8
    assert backbone.strides == (1, 2, 4, 8)  # patch 4: 4/4, 4/2, 4, 8 (ViT-S/16: 4, 8, 16, 32)
    assert [tuple(v.shape) for v in levels.values()] == [(2, 8, size // s, size // s) for s in (1, 2, 4, 8)]


def test_vit_map_is_the_last_blocks_patch_tokens_without_prefix_or_norm():
    """Written out from timm's parts: patch embedding, position embedding, blocks, prefix tokens dropped."""
    vit = tiny_vit(reg_tokens=2).eval()  # a class token and 2 registers: 3 prefix tokens
    backbone = ViTDetBackbone(vit, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit._pos_embed(vit.patch_embed(x))  # (B, 3 + 8*8, C)
        for block in vit.blocks:
            tokens = block(tokens)
        expected = tokens[:, 3:].reshape(2, 8, 8, 24).permute(0, 3, 1, 2)  # (B, C, 8, 8)
        assert torch.allclose(backbone.vit_map(x), expected, atol=1e-6)


def test_the_sar_last_block_is_kept():
    backbone = ViTDetBackbone(tiny_vit("C"), 32)
    assert isinstance(backbone.vit.blocks[-1], SARBlock)
    plain = ViTDetBackbone(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, **TINY), 32)
    assert not isinstance(plain.vit.blocks[-1], SARBlock)


def test_levels_are_computed_as_vitdet_builds_them():
    """Level 3 is the max-pool of the map through its own convs; level 2 the map itself through them."""
    pyramid = SimpleFeaturePyramid(8, out_channels=4).eval()
    x = torch.randn(1, 8, 6, 6)
    levels = pyramid(x)
    tail = pyramid.stages[3][1:]  # conv 1x1, LN, conv 3x3, LN
    assert torch.allclose(levels[3], tail(torch.nn.functional.max_pool2d(x, 2)), atol=1e-6)
    assert torch.allclose(levels[2], pyramid.stages[2][1:](x), atol=1e-6)


def test_unsupported_backbones_are_refused():
    with pytest.raises(UnsupportedModel, match="VisionTransformer"):
        ViTDetBackbone(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="multiple of 4"):
        ViTDetBackbone(tiny_vit(patch_size=2))


def test_anchor_sizes_are_eight_strides():
    assert anchor_sizes((4, 8, 16, 32, 64)) == ((32,), (64,), (128,), (256,), (512,))


def test_detector_gives_torchvision_losses_and_detections():
    detector = build_detector(tiny_vit(), 3, 32, masks=True, out_channels=8)
    mask = torch.zeros(1, 32, 32, dtype=torch.uint8)
    mask[0, 4:20, 6:22] = 1
    target = {"boxes": torch.tensor([[6.0, 4, 22, 20]]), "labels": torch.tensor([2]), "masks": mask}
    losses = detector.train()([torch.rand(3, 32, 32)], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    out = detector.eval()([torch.rand(3, 32, 32)])
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}


def test_rois_per_image_sets_how_many_proposals_reach_the_box_head():
    detector = build_detector(tiny_vit(), 3, 32, masks=False, out_channels=8, rois_per_image=16)
    seen = []
    detector.roi_heads.box_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    target = {"boxes": torch.tensor([[6.0, 4, 22, 20]]), "labels": torch.tensor([2])}
    detector.train()([torch.rand(3, 32, 32), torch.rand(3, 32, 32)], [target, target])
    assert seen == [2 * 16]


@pytest.mark.parametrize("scores,drawn", [([0.7, 0.2, 0.5], [True, False, True]),  # those of 0.5 or more
                                          ([0.2, 0.4, 0.1], [False, True, False]),  # none: the best alone
                                          ([], [])])
def test_the_figure_draws_confident_detections_or_else_the_best_one(scores, drawn):
    from sarvit.dense.tasks import shown_detections

    assert shown_detections(torch.tensor(scores)).tolist() == drawn
