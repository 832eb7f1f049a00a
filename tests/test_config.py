import math

import pytest
import yaml

from sarvit.config import ConfigError, TrainConfig, load_config, recipe_path, to_dict
from sarvit.objectives import lambda_at


def test_yaml_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nlambda: 0.05\nbatch_size: 32\nmodel_kwargs: {depth: 3}\n")
    cfg = load_config(recipe, {"batch-size": "16", "sar": "false"})
    assert (cfg.epochs, cfg.lambda_, cfg.batch_size, cfg.sar, cfg.model_kwargs) == (7, 0.05, 16, False, {"depth": 3})
    assert to_dict(cfg)["lambda"] == 0.05
    assert load_config(None).lambda_ == TrainConfig().lambda_ == 0.01


@pytest.mark.parametrize("overrides,message", [
    ({"lambda": "-0.1"}, "lambda must be >= 0"),
    ({"lambda_schedule": "linear"}, "lambda_schedule must be one of"),
    ({"per_class": "10", "train_fraction": "0.5"}, "not both"),
    ({"train_fraction": "1.5"}, r"\(0, 1\]"),
    ({"epochs": "ten"}, "cannot read 'ten' as int"),
    ({"batch_size": "33"}, "must be even"),
    ({"layout": "E"}, "layout must be one of"),
    ({"lamda": "1"}, "did you mean lambda"),
])
def test_bad_values_are_rejected_with_a_reason(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_shipped_recipes_load_and_name_resolution():
    for name in ("fashion_mnist_cpu", "vit_s16_in100_100ep", "vit_s16_in1k_300ep"):
        cfg = load_config(name)
        assert recipe_path(name).is_file() and cfg.epochs >= 1
    paper = load_config("vit_s16_in100_100ep")
    assert (paper.model, paper.epochs, paper.lambda_, paper.mixup, paper.cutmix) == (
        "vit_small_patch16_224", 100, 0.01, 0.8, 1.0)
    with pytest.raises(ConfigError, match="recipes:"):
        recipe_path("no_such_recipe")


def test_every_shipped_recipe_is_valid():
    from importlib import resources

    names = [p.name for p in resources.files("sarvit").joinpath("configs").iterdir() if p.name.endswith(".yaml")]
    assert len(names) >= 6
    for name in names:
        text = resources.files("sarvit").joinpath("configs", name).read_text()
        assert text.startswith("#"), f"{name} needs a first-line description"
        load_config(name.removesuffix(".yaml"))
        assert isinstance(yaml.safe_load(text), dict)


def test_lambda_schedules_by_hand():
    assert lambda_at("constant", 0.01, 0.0, 100) == 0.01
    assert lambda_at("constant", 0.01, 99.5, 100) == 0.01
    # warm-up: linear 0 -> lambda over 10 epochs
    assert lambda_at("warmup_cosine", 0.01, 0.0, 100) == 0.0
    assert math.isclose(lambda_at("warmup_cosine", 0.01, 5.0, 100), 0.005)
    assert math.isclose(lambda_at("warmup_cosine", 0.01, 10.0, 100), 0.01)
    # then cosine to 0 over the remaining 90 epochs: half-way (epoch 55) is lambda / 2
    assert math.isclose(lambda_at("warmup_cosine", 0.01, 55.0, 100), 0.005)
    assert math.isclose(lambda_at("warmup_cosine", 0.01, 32.5, 100), 0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert abs(lambda_at("warmup_cosine", 0.01, 100.0, 100)) < 1e-15
