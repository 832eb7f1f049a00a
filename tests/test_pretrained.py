"""Loading pre-trained backbones: every format round-trips, reports say what happened, E.4's layout rule."""

import argparse

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from sarvit import checkpoint as ckpt
from sarvit.errors import ConfigError, UserError, WeightsNotFound
from sarvit.factory import create_model
from sarvit.pretrained import (
    BACKBONE, HEAD, PROJECTION, UNEXPECTED, finetune_layout, load_pretrained, pretrained_layout, read_checkpoint,
)

KWARGS = dict(patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0)
HEAD_KEYS = ("head.weight", "head.bias")


def tiny(num_classes=4, img_size=16, seed=0, layout="C", **changes):
    torch.manual_seed(seed)
    return create_model("vit_tiny_patch16_224", num_classes, img_size=img_size,
                        model_kwargs={**KWARGS, **changes}, layout=layout)


def metadata(layout="C", num_classes=10, **extra):
    return {"model": "vit_tiny_patch16_224", "model_kwargs": KWARGS, "img_size": 16, "num_classes": num_classes,
            "layout": layout, "query": "cls", "sar": layout == "C"} | extra


def source_state(seed=1, num_classes=10):
    """A network's tensors, distinct from what a fresh ``tiny()`` holds."""
    state = tiny(num_classes, seed=seed).state_dict()
    return {k: v.clone() for k, v in state.items()}


def backbone_of(state):
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def check_loaded(model, expected, head_before):
    """Every backbone tensor equals ``expected``; the head kept its fresh values."""
    got = model.state_dict()
    for key, tensor in backbone_of(expected).items():
        assert torch.equal(got[key], tensor), key
    for key in HEAD_KEYS:
        assert torch.equal(got[key], head_before[key]), key


def fresh():
    model = tiny()
    return model, {k: model.state_dict()[k].clone() for k in HEAD_KEYS}


# --- each source format ----------------------------------------------------------------------


def test_a_sarvit_run_folder_loads_its_best_weights_and_reinitialises_the_head(tmp_path):
    source = tiny(10, seed=1)
    ckpt.save_weights(source, tmp_path / "best.safetensors", metadata())
    model, head = fresh()
    report = load_pretrained(model, tmp_path)
    check_loaded(model, source.state_dict(), head)
    assert report.dropped == {"head.weight": HEAD, "head.bias": HEAD}
    assert report.initialised == HEAD_KEYS
    assert set(report.loaded) == set(backbone_of(source.state_dict())) and report.resampled == {}
    assert report.metadata["num_classes"] == 10 and "best.safetensors" in report.kind
    x = torch.randn(2, 3, 16, 16)
    model.eval(), source.eval()
    assert torch.equal(model.forward_features(x), source.forward_features(x))  # the same backbone function
    text = report.text()
    assert "loaded 30 tensors" in text
    assert f"dropped 2 ({HEAD}): head.weight, head.bias" in text  # in the model's order
    assert "newly initialised 2 (classifier head): head.weight, head.bias" in text


def test_a_run_folder_without_best_weights_loads_its_newest_intact_checkpoint(tmp_path):
    older, newer = tiny(10, seed=1), tiny(10, seed=2)
    ckpt.save_checkpoint(tmp_path, 1, older, {"step": 1}, metadata())
    ckpt.save_checkpoint(tmp_path, 2, newer, {"step": 2}, metadata())
    model, head = fresh()
    report = load_pretrained(model, tmp_path)
    check_loaded(model, newer.state_dict(), head)
    assert report.path == tmp_path / "checkpoints" / "step-00000002" / "model.safetensors"
    model, head = fresh()
    load_pretrained(model, tmp_path / "checkpoints" / "step-00000001")  # a checkpoint folder itself
    check_loaded(model, older.state_dict(), head)


def test_a_pretrain_run_folder_prefers_its_backbone_file(tmp_path):
    ckpt.save_weights(tiny(10, seed=1), tmp_path / "best.safetensors", metadata())
    backbone = backbone_of(source_state(seed=2))
    save_file(backbone, str(tmp_path / BACKBONE))
    model, head = fresh()
    report = load_pretrained(model, tmp_path)
    check_loaded(model, backbone, head)
    assert report.dropped == {} and report.initialised == HEAD_KEYS and BACKBONE in report.kind


@pytest.mark.parametrize("with_metadata", [True, False])
def test_a_single_safetensors_file(tmp_path, with_metadata):
    state = source_state()
    path = tmp_path / "weights.safetensors"
    save_file(state, str(path), metadata={"sarvit": '{"layout": "C"}'} if with_metadata else None)
    model, head = fresh()
    report = load_pretrained(model, path)
    check_loaded(model, state, head)
    assert report.dropped == {"head.weight": HEAD, "head.bias": HEAD}
    assert report.metadata == ({"layout": "C"} if with_metadata else {})


@pytest.mark.parametrize("suffix, wrap", [
    (".pth", lambda s: s),
    (".pt", lambda s: {"model": s, "epoch": 3, "args": argparse.Namespace(lr=1e-3)}),  # DeiT's checkpoint
    (".bin", lambda s: {"state_dict": {"module." + k: v for k, v in s.items()}}),  # saved under DDP
    (".safetensors", None),
])
def test_timm_state_dicts(tmp_path, suffix, wrap):
    state = source_state()
    path = tmp_path / f"weights{suffix}"
    if wrap is None:
        save_file(state, str(path))
    else:
        torch.save(wrap(state), path)
    model, head = fresh()
    report = load_pretrained(model, path)
    check_loaded(model, state, head)
    assert report.dropped == {"head.weight": HEAD, "head.bias": HEAD} and report.initialised == HEAD_KEYS


def dino_head():
    return {"head.mlp.0.weight": torch.randn(32, 24), "head.mlp.0.bias": torch.randn(32),
            "head.last_layer.weight_g": torch.randn(64, 1), "head.last_layer.weight_v": torch.randn(64, 32)}


def dino_checkpoint(teacher, student):
    """DINO's checkpoint.pth: the teacher not wrapped in DDP, the student wrapped."""
    return {
        "teacher": {**{"backbone." + k: v for k, v in teacher.items()}, **dino_head()},
        "student": {**{"module.backbone." + k: v for k, v in student.items()},
                    **{"module." + k: v for k, v in dino_head().items()}},
        "optimizer": {"state": {}, "param_groups": []}, "epoch": 100, "args": argparse.Namespace(arch="vit_small"),
        "dino_loss": {"center": torch.zeros(1, 64)},
    }


@pytest.mark.parametrize("which", [None, "teacher", "student"])
def test_dino_checkpoints_load_the_teacher_by_default_and_drop_the_projection_head(tmp_path, which):
    teacher, student = backbone_of(source_state(seed=1)), backbone_of(source_state(seed=2))
    torch.save(dino_checkpoint(teacher, student), tmp_path / "checkpoint.pth")
    model, head = fresh()
    report = load_pretrained(model, tmp_path / "checkpoint.pth", which=which)
    check_loaded(model, student if which == "student" else teacher, head)
    assert report.dropped == {k: PROJECTION for k in dino_head()}
    assert report.initialised == HEAD_KEYS and "DINO" in report.kind


def test_a_dino_wrapper_state_dict_without_teacher_and_student(tmp_path):
    state = backbone_of(source_state())
    torch.save({**{"module.backbone." + k: v for k, v in state.items()}, **dino_head()}, tmp_path / "s.pth")
    model, head = fresh()
    report = load_pretrained(model, tmp_path / "s.pth")
    check_loaded(model, state, head)
    assert report.dropped == {k: PROJECTION for k in dino_head()}


def moco_checkpoint(base, momentum):
    projector = {"head.0.weight": torch.randn(32, 24), "head.1.running_mean": torch.randn(32),
                 "head.3.weight": torch.randn(16, 32)}
    predictor = {"predictor.0.weight": torch.randn(32, 16), "predictor.3.weight": torch.randn(16, 32)}
    state = {**{f"module.base_encoder.{k}": v for k, v in {**base, **projector}.items()},
             **{f"module.momentum_encoder.{k}": v for k, v in {**momentum, **projector}.items()},
             **{f"module.{k}": v for k, v in predictor.items()}}
    return {"epoch": 300, "arch": "vit_small", "state_dict": state, "optimizer": {}, "scaler": {}}, projector, predictor


@pytest.mark.parametrize("which", [None, "base", "momentum"])
def test_moco_v3_checkpoints_load_the_base_encoder_by_default(tmp_path, which):
    base, momentum = backbone_of(source_state(seed=1)), backbone_of(source_state(seed=2))
    obj, projector, predictor = moco_checkpoint(base, momentum)
    torch.save(obj, tmp_path / "checkpoint_0299.pth.tar")
    model, head = fresh()
    report = load_pretrained(model, tmp_path / "checkpoint_0299.pth.tar", which=which)
    check_loaded(model, momentum if which == "momentum" else base, head)
    dropped = {**projector, **predictor} if which != "momentum" else projector
    assert report.dropped == {k: PROJECTION for k in dropped} and report.initialised == HEAD_KEYS


def test_which_must_fit_the_checkpoint(tmp_path):
    base = backbone_of(source_state())
    torch.save(moco_checkpoint(base, base)[0], tmp_path / "moco.pth")
    torch.save(dino_checkpoint(base, base), tmp_path / "dino.pth")
    torch.save(base, tmp_path / "plain.pth")
    for path, which in (("moco.pth", "teacher"), ("dino.pth", "momentum"), ("plain.pth", "student"),
                        ("plain.pth", "ema")):
        with pytest.raises(ConfigError, match="which"):
            read_checkpoint(tmp_path / path, which=which)


def test_keep_head_loads_a_head_of_the_same_shape(tmp_path):
    state = source_state(num_classes=4)
    save_file(state, str(tmp_path / "w.safetensors"))
    model = tiny()
    report = load_pretrained(model, tmp_path / "w.safetensors", keep_head=True)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert report.dropped == {} and report.initialised == ()


def test_a_model_without_head_reports_the_checkpoint_head_as_dropped_and_initialises_nothing(tmp_path):
    state = source_state()
    save_file(state, str(tmp_path / "w.safetensors"))
    model = tiny(num_classes=0)
    report = load_pretrained(model, tmp_path / "w.safetensors")
    assert report.dropped == {"head.weight": HEAD, "head.bias": HEAD} and report.initialised == ()


def test_extra_tensors_are_dropped_as_unexpected(tmp_path):
    state = source_state()
    extra = {"decoder_embed.weight": torch.randn(8, 24), "mask_token": torch.randn(1, 1, 24)}  # MAE's
    save_file({**state, **extra}, str(tmp_path / "w.safetensors"))
    model, head = fresh()
    report = load_pretrained(model, tmp_path / "w.safetensors")
    check_loaded(model, state, head)
    assert report.dropped == {"head.weight": HEAD, "head.bias": HEAD, "decoder_embed.weight": UNEXPECTED,
                              "mask_token": UNEXPECTED}
    assert f"dropped 2 ({UNEXPECTED}): decoder_embed.weight, mask_token" in report.text()


# --- position embeddings -----------------------------------------------------------------------


@pytest.mark.parametrize("img_size", [24, 8])
def test_pos_embed_is_resampled_to_the_model_grid(tmp_path, img_size):
    state = source_state()  # a 4x4 grid (16 pixels, patch 4)
    save_file(state, str(tmp_path / "w.safetensors"))
    model = tiny(img_size=img_size)
    report = load_pretrained(model, tmp_path / "w.safetensors")
    grid = img_size // 4
    by_hand = resample_abs_pos_embed(state["pos_embed"], new_size=[grid, grid], old_size=[4, 4], num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 1 + grid * grid, 24)
    assert torch.equal(model.pos_embed.detach(), by_hand)
    assert torch.equal(model.pos_embed.detach()[0, 0], state["pos_embed"][0, 0])  # the class token's is kept
    assert report.resampled == {"pos_embed": ((4, 4), (grid, grid))}
    assert f"resampled pos_embed: grid 4x4 -> {grid}x{grid}" in report.text()
    assert model(torch.randn(1, 3, img_size, img_size)).shape == (1, 4)


def test_pos_embed_of_a_model_whose_prefix_tokens_have_none(tmp_path):
    source = tiny(seed=1, no_embed_class=True)  # pos_embed (1, 16, C): the grid only
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model = tiny(img_size=24, no_embed_class=True)
    report = load_pretrained(model, tmp_path / "w.safetensors")
    by_hand = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4],
                                     num_prefix_tokens=0)
    assert source.pos_embed.shape == (1, 16, 24)
    assert torch.equal(model.pos_embed.detach(), by_hand) and report.resampled["pos_embed"] == ((4, 4), (6, 6))


# --- errors ------------------------------------------------------------------------------------


def test_shape_mismatches_name_the_keys_and_both_shapes(tmp_path):
    save_file(tiny(10, seed=1, embed_dim=32).state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError, match=r"cls_token: checkpoint \(1, 1, 32\), model \(1, 1, 24\)"):
        load_pretrained(tiny(), tmp_path / "w.safetensors")


def test_a_shallower_or_deeper_checkpoint_is_refused(tmp_path):
    save_file(tiny(10, seed=1, depth=1).state_dict(), str(tmp_path / "shallow.safetensors"))
    ckpt.save_weights(tiny(10, seed=1, depth=3), tmp_path / "deep.safetensors",
                      metadata(model_kwargs={**KWARGS, "depth": 3}))
    with pytest.raises(UserError, match=r"lacks 12 tensors the model needs: blocks\.1\.norm1\.weight"):
        load_pretrained(tiny(), tmp_path / "shallow.safetensors")
    deeper = r"holds layers the model lacks: blocks\.2\..*\(\+6 more\).*vit_tiny_patch16_224 .*'depth': 3"
    with pytest.raises(UserError, match=deeper):
        load_pretrained(tiny(), tmp_path / "deep.safetensors")


def test_missing_and_unloadable_sources_are_user_errors(tmp_path):
    with pytest.raises(WeightsNotFound, match="no such file or run folder"):
        load_pretrained(tiny(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFound, match=r"looked for .*backbone\.safetensors.*best\.safetensors"):
        load_pretrained(tiny(), tmp_path / "empty")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "nothing.pth")
    with pytest.raises(UserError, match="holds no tensors"):
        load_pretrained(tiny(), tmp_path / "nothing.pth")
    torch.save({"conv1.weight": torch.randn(8, 3, 7, 7), "fc.weight": torch.randn(10, 8)}, tmp_path / "resnet.pth")
    with pytest.raises(UserError, match="none of the 2 tensors"):
        load_pretrained(tiny(), tmp_path / "resnet.pth")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UserError, match="cannot read"):
        load_pretrained(tiny(), tmp_path / "cut.safetensors")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read"):
        load_pretrained(tiny(), tmp_path / "garbage.pth")


UNPICKLED = []


class Opaque:
    """An object whose unpickling would leave a trace."""

    def __setstate__(self, state):
        UNPICKLED.append(state)


def test_pickled_objects_are_not_executed(tmp_path):
    obj = Opaque()
    obj.x = 1
    torch.save({"model": source_state(), "extra": obj}, tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"Python objects besides tensors \([\w.]*Opaque\)"):
        load_pretrained(tiny(), tmp_path / "w.pth")
    assert UNPICKLED == []


# --- the last-block layout (appendix E.4, Table 7) ----------------------------------------------


def test_pretrained_layout_reads_the_metadata(tmp_path):
    for name, layout in (("sar", "sar"), ("c", "C"), ("a", "A"), ("std", "standard")):
        (tmp_path / name).mkdir()
        ckpt.save_weights(tiny(10), tmp_path / name / "best.safetensors", metadata(layout=layout))
    assert [pretrained_layout(tmp_path / n) for n in ("sar", "c", "a", "std")] == ["C", "C", "A", "A"]
    save_file(source_state(), str(tmp_path / "foreign.safetensors"))
    torch.save(source_state(), tmp_path / "timm.pth")
    assert pretrained_layout(tmp_path / "foreign.safetensors") is None
    assert pretrained_layout(tmp_path / "timm.pth") is None
    with pytest.raises(WeightsNotFound):
        pretrained_layout(tmp_path / "nowhere")


# Table 7's four rows: (SAR in pre-training, SAR in fine-tuning) -> the fine-tuned block
@pytest.mark.parametrize("source, sar, expected", [
    ("A", False, "A"),  # standard fine-tuning
    ("C", False, "C"),  # SAR pre-training only: keep Eq. 10-11, train with L_ce
    ("A", True, "A"),  # SAR fine-tuning only: keep Eq. 1-2, train with L_ce + lambda L_se
    ("C", True, "C"),  # both
    (None, True, "A"),  # a checkpoint from elsewhere: a standard block
    (None, False, "A"),
    ("sar", True, "C"),
])
def test_finetuning_keeps_the_pretrained_block(source, sar, expected):
    assert finetune_layout(source, sar, None) == expected
    assert finetune_layout(source, sar, expected) == expected  # asking for it explicitly agrees


@pytest.mark.parametrize("source, asked", [("C", "A"), ("C", "standard"), ("A", "sar"), ("A", "C"), ("C", "D")])
def test_an_asked_layout_that_contradicts_the_checkpoint_is_refused(source, asked):
    with pytest.raises(ConfigError, match=f"pre-trained with last-block layout {source}.*set it to {source}"):
        finetune_layout(source, True, asked)


def test_an_asked_layout_decides_for_a_checkpoint_of_unknown_layout():
    assert finetune_layout(None, False, "sar") == "C"
    with pytest.raises(ConfigError, match="unknown last-block layout"):
        finetune_layout(None, True, "E")
