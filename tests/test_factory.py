import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sarvit import checkpoint as ckpt
from sarvit.errors import ConfigError, UnsupportedModel, UserError, WeightsNotFound
from sarvit.factory import create_model, load_model, resolve_weights

KWARGS = {"patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def saved_model(path, img_size=32, patch_size=8, seed=0):
    """A tiny SAR model written the way the trainer writes its weights (same metadata keys)."""
    kwargs = {**KWARGS, "patch_size": patch_size}
    torch.manual_seed(seed)
    model = create_model("vit_tiny_patch16_224", 3, img_size=img_size, model_kwargs=kwargs)
    meta = {"model": "vit_tiny_patch16_224", "model_kwargs": kwargs, "img_size": img_size, "num_classes": 3,
            "classes": ["a", "b", "c"], "layout": "C", "query": "cls", "data": "somewhere"}
    ckpt.save_weights(model, path, meta)
    return model


def pil_bicubic(grid: np.ndarray, size: int) -> np.ndarray:
    """(h, w, C) -> (size, size, C), each channel resized by Pillow's bicubic filter (a = -0.5)."""
    channels = [np.asarray(Image.fromarray(grid[:, :, c].astype(np.float32), mode="F").resize((size, size),
                                                                                            Image.BICUBIC))
                for c in range(grid.shape[-1])]
    return np.stack(channels, axis=-1)


# --- create_model -------------------------------------------------------------------------------


@pytest.mark.parametrize("img_size,patch,nearest", [(30, 8, "24 or 32"), (20, 16, "16 or 32"), (7, 8, "8")])
def test_image_sizes_the_patch_does_not_divide_are_refused(img_size, patch, nearest):
    with pytest.raises(ConfigError) as caught:
        create_model("vit_tiny_patch16_224", 3, img_size=img_size, model_kwargs={**KWARGS, "patch_size": patch})
    message = str(caught.value)
    assert f"img_size {img_size} is not a multiple of the patch size {patch}x{patch}" in message
    assert message.endswith(f"use {nearest}")
    assert f"the last {img_size % patch} rows" in message


def test_unsupported_family_is_named_before_the_arguments():
    with pytest.raises(UnsupportedModel) as caught:
        create_model("resnet18", 3, img_size=32, drop_path=0.1)
    message = str(caught.value)
    assert "SAR supports these families: timm VisionTransformer" in message
    assert "does not accept" not in message and "timm.models.resnet.ResNet" in message


def test_unknown_names_and_arguments_are_user_errors():
    with pytest.raises(ConfigError, match="unknown model 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        create_model("vit_tiny_patch16_22", 3)
    with pytest.raises(ConfigError, match="does not accept these arguments"):
        create_model("vit_tiny_patch16_224", 3, img_size=32, model_kwargs={**KWARGS, "depht": 2})


def test_meta_device_checks_without_weights():
    with torch.device("meta"):
        model = create_model("vit_tiny_patch16_224", 3, img_size=32, model_kwargs=KWARGS)
    assert model.pos_embed.device.type == "meta" and model.patch_embed.grid_size == (4, 4)


# --- load_model at another resolution -------------------------------------------------------------


@pytest.mark.parametrize("trained,patch,evaluated", [(32, 8, 48), (224, 16, 480)])
def test_load_at_another_size_resamples_the_position_embeddings(tmp_path, trained, patch, evaluated):
    original = saved_model(tmp_path / "w.safetensors", img_size=trained, patch_size=patch)
    model, meta = load_model(tmp_path / "w.safetensors", img_size=evaluated)
    k_old, k_new = trained // patch, evaluated // patch
    assert meta["img_size"] == trained and model.patch_embed.grid_size == (k_new, k_new)
    pos_old = original.pos_embed.detach()[0].numpy()  # (1 + k_old^2, C)
    pos_new = model.pos_embed.detach()[0].numpy()  # (1 + k_new^2, C)
    np.testing.assert_array_equal(pos_new[0], pos_old[0])  # the class token's embedding is kept
    grid = pos_old[1:].reshape(k_old, k_old, -1)  # (k, k, C), row-major as the tokens
    np.testing.assert_allclose(pos_new[1:].reshape(k_new, k_new, -1), pil_bicubic(grid, k_new), atol=2e-5)
    # the other weights are the trained ones, and the model runs at the new size
    torch.testing.assert_close(model.blocks[-1].attn.qkv.weight, original.blocks[-1].attn.qkv.weight)
    logits, S = model.eval().forward_with_similarity(torch.randn(2, 3, evaluated, evaluated))
    assert logits.shape == (2, 3) and S.shape == (2, 2, k_new, k_new)


def test_load_at_a_size_the_patch_does_not_divide_is_refused(tmp_path):
    saved_model(tmp_path / "w.safetensors")
    with pytest.raises(ConfigError, match="img_size 50 is not a multiple of the patch size 8x8.*use 48 or 56"):
        load_model(tmp_path / "w.safetensors", img_size=50)


def test_load_at_the_training_size_gives_the_saved_function(tmp_path):
    original = saved_model(tmp_path / "w.safetensors").eval()
    model, _ = load_model(tmp_path / "w.safetensors", img_size=32)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), original(x))


# --- damaged and foreign files ------------------------------------------------------------------------


def test_truncated_weights_are_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    saved_model(path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(ConfigError) as caught:
            load_model(path)
        assert str(path) in str(caught.value) and "copy it again" in str(caught.value)


def test_foreign_and_garbled_files_are_user_errors(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ConfigError, match=f"{foreign} was not written by sarvit"):
        load_model(foreign)
    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad_json), metadata={ckpt.METADATA_KEY: "{not json"})
    with pytest.raises(ConfigError, match=f"{bad_json} is not a readable safetensors file"):
        load_model(bad_json)
    text = tmp_path / "notes.safetensors"
    text.write_text("these are not weights")
    with pytest.raises(ConfigError, match=f"{text} is not a readable safetensors file"):
        load_model(text)


def test_weights_that_do_not_fit_their_description_are_a_user_error(tmp_path):
    path = tmp_path / "w.safetensors"
    saved_model(path)
    tensors = ckpt.load_weights(path)
    meta = ckpt.read_metadata(path)
    meta["model_kwargs"]["depth"] = 3  # the description no longer matches the tensors
    save_file(tensors, str(path), metadata={ckpt.METADATA_KEY: json.dumps(meta)})
    with pytest.raises(ConfigError, match="do not fit the model its metadata describes"):
        load_model(path)


# --- resolve_weights ------------------------------------------------------------------------------------


def test_resolve_weights_in_a_run_folder(tmp_path):
    from sarvit import checkpoint as ckpt

    run = tmp_path / "run"
    model = torch.nn.Linear(2, 2)
    first = ckpt.save_checkpoint(run, 5, model, {"step": 5}, {})
    second = ckpt.save_checkpoint(run, 10, model, {"step": 10}, {}, previous=first.name)
    last = run / "checkpoints" / "last" / "model.safetensors"
    assert resolve_weights(run, "best") == second / "model.safetensors"  # no best.safetensors yet: the last
    (run / "best.safetensors").write_bytes(b"best")
    assert resolve_weights(run, "best") == run / "best.safetensors"
    assert resolve_weights(run, "last") == second / "model.safetensors" == last.resolve()
    assert resolve_weights(run / "best.safetensors", "last") == run / "best.safetensors"  # a file is itself
    for which in ("best", "last"):  # a checkpoint folder: its own weights, whatever --which says
        assert resolve_weights(first, which) == first / "model.safetensors"
        last_folder = run / "checkpoints" / "last"
        assert resolve_weights(last_folder, which) == last_folder / "model.safetensors"
    with pytest.raises(WeightsNotFound, match=f"checkpoint {first} holds no ema.safetensors"):
        resolve_weights(first, "best_ema")
    with open(second / "model.safetensors", "r+b") as f:  # a damaged `last`: the checkpoint before it
        f.truncate(10)
    assert resolve_weights(run, "last") == first / "model.safetensors"


def test_resolve_weights_says_what_it_looked_for(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(WeightsNotFound) as caught:
        resolve_weights(run, "best_ema")
    assert str(caught.value) == f"{run} holds no best_ema weights; looked for: {run}/best_ema.safetensors"
    with pytest.raises(WeightsNotFound) as caught:
        resolve_weights(run, "last")
    looked = f"{run}/checkpoints/last/model.safetensors, {run}/model.safetensors"
    assert str(caught.value) == f"{run} holds no last weights; looked for: {looked}"
    with pytest.raises(WeightsNotFound, match=f"no such file or run folder: {tmp_path}/elsewhere"):
        resolve_weights(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="which must be one of best, last, best_ema; got 'newest'"):
        resolve_weights(run, "newest")
    assert issubclass(WeightsNotFound, UserError) and issubclass(WeightsNotFound, FileNotFoundError)


def test_pvt_sizes_are_refused_in_the_model_s_own_words():
    from sarvit.factory import create_model

    with pytest.raises(ConfigError) as caught:
        create_model("pvt_small", 10, img_size=48)
    assert str(caught.value).startswith("img_size is 48x48: PVT needs multiples of 32")
    assert "model_kwargs" not in str(caught.value)


def test_pooled_keys_of_pvt_v2_li_are_refused_below_224():
    from sarvit.factory import create_model

    kwargs = {"embed_dims": [8, 8, 8, 16], "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 2],
              "mlp_ratios": [1, 1, 1, 1]}
    with pytest.raises(ConfigError, match="pools its keys to a 7x7 grid: at img_size 64"):
        create_model("pvt_v2_b2_li", 3, img_size=64, model_kwargs=kwargs)
    model = create_model("pvt_v2_b2_li", 3, img_size=224, model_kwargs=kwargs)
    _, S = model.forward_with_similarity(torch.randn(1, 3, 224, 224))
    assert S.shape[-2:] == (7, 7)
    create_model("pvt_v2_b0", 3, img_size=64, model_kwargs=kwargs)  # keys reduced by a strided conv: any size
