import math

import pytest
import yaml

from sarvit.config import (
    FIELDS, RULES, ConfigError, TrainConfig, check_field, load_config, recipe_path, resolved_layout, task_fields,
    to_dict,
    validate_with_libraries,
)
from sarvit.objectives import lambda_at


def test_yaml_then_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\nlambda: 0.05\nbatch_size: 32\nmodel_kwargs: {depth: 3}\n")
    cfg = load_config(recipe, {"batch-size": "16", "sar": "false"})
    assert (cfg.epochs, cfg.lambda_, cfg.batch_size, cfg.sar, cfg.model_kwargs) == (7, 0.05, 16, False, {"depth": 3})
    assert to_dict(cfg)["lambda"] == 0.05


def test_defaults_are_the_papers_recipe():
    """lambda = 0.01 (Sec. 5.1) and the DeiT recipe of the published code (DESIGN.md, section 2)."""
    cfg = load_config(None)
    paper = {"lambda_": 0.01, "opt": "adamw", "base_lr": 5e-4, "weight_decay": 0.05, "sched": "cosine",
             "warmup_epochs": 5, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
             "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "drop_path": 0.1, "sar": True}
    assert {k: getattr(cfg, k) for k in paper} == paper
    assert resolved_layout(cfg) == "C" and resolved_layout(load_config(None, {"sar": "false"})) == "A"


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
        assert recipe_path(name).is_file()
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
        written = yaml.safe_load(text)
        command = {"dino": "pretrain", "mocov3": "pretrain", "linprobe": "linprobe", "detect": "detect",
                   "segment": "segment"}.get(written.get("task"), "train")
        cfg = to_dict(load_config(name.removesuffix(".yaml"), command=command))
        assert isinstance(written, dict)
        for key, value in written.items():  # every value of the file reaches the config, as a number where one
            expected = list(value) if isinstance(value, list) else value
            assert cfg[key] == (float(expected) if isinstance(cfg[key], float) else expected), (name, key)


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


# --- every option range-checked from its one declaration ---------------------------------------------

# (option, bad value as typed, the words the message must hold): each must fail in load_config
BAD_VALUES = [
    ("clip_grad", "-1", "clip_grad must be > 0 or none; got -1"),
    ("clip_grad", "0", "clip_grad must be > 0"),
    ("lambda", "nan", "lambda must be a finite number >= 0; got nan"),
    ("lambda", "inf", "lambda must be a finite number >= 0; got inf"),
    ("lambda", "-0.1", "lambda must be >= 0"),
    ("model_ema_decay", "2", "model_ema_decay must be in (0, 1); got 2"),
    ("model_ema_decay", "1", "model_ema_decay must be in (0, 1)"),
    ("crop_pct", "0", "crop_pct must be in (0, 1]; got 0"),
    ("crop_pct", "5", "crop_pct must be in (0, 1]; got 5"),
    ("hflip", "2", "hflip must be in [0, 1]; got 2"),
    ("reprob", "5", "reprob must be in [0, 1]"),
    ("mixup_prob", "2", "mixup_prob must be in [0, 1]"),
    ("mixup_switch_prob", "-0.5", "mixup_switch_prob must be in [0, 1]"),
    ("warmup_lr", "-1", "warmup_lr must be >= 0; got -1"),
    ("auto_augment", "rand-bogus", "'bogus' is none of them"),
    ("auto_augment", "rand-m9-p2", "'p2' is more"),
    ("auto_augment", "randaug-m9", "auto_augment must be none, rand-"),
    ("auto_augment", "augmix-m5-q3", "'q3' is none of them"),
    ("smoothing", "1.5", "smoothing must be in [0, 1); got 1.5"),
    ("smoothing", "1", "smoothing must be in [0, 1)"),
    ("drop_path", "1.5", "drop_path must be in [0, 1); got 1.5"),
    ("min_lr", "-1", "min_lr must be >= 0; got -1"),
    ("interpolation", "cubicc", "interpolation must be one of bilinear, bicubic, nearest, lanczos, box, hamming"),
    ("device", "gpu0", "device must be auto, cpu, cuda, cuda:N (N a GPU index) or mps; got 'gpu0'"),
    ("device", "cuda:x", "device must be auto, cpu"),
    ("img_size", "0", "img_size must be >= 1"),
    ("per_class", "0", "per_class must be >= 1 or none"),
    ("val_per_class", "0", "val_per_class must be >= 1 or none"),
    ("train_fraction", "0", "train_fraction must be in (0, 1]"),
    ("workers", "-1", "workers must be >= 0"),
    ("drop_path", "-0.1", "drop_path must be in [0, 1)"),
    ("lambda_warmup_epochs", "-1", "lambda_warmup_epochs must be >= 0"),
    ("objective", "se", "objective must be one of sar, sar_softmax, sar_cosine, tv, entropy, drloc; got 'se'"),
    ("drloc_lambda", "-0.1", "drloc_lambda must be >= 0"),
    ("drloc_lambda", "inf", "drloc_lambda must be a finite number >= 0"),
    ("drloc_warmup_epochs", "-1", "drloc_warmup_epochs must be >= 0"),
    ("drloc_pairs", "0", "drloc_pairs must be >= 1"),
    ("epochs", "0", "epochs must be >= 1"),
    ("batch_size", "0", "batch_size must be >= 1"),
    ("lr", "0", "lr must be > 0 or none"),
    ("lr", "-inf", "lr must be a finite number > 0"),
    ("base_lr", "0", "base_lr must be > 0"),
    ("weight_decay", "-0.05", "weight_decay must be >= 0"),
    ("momentum", "1", "momentum must be in [0, 1)"),
    ("warmup_epochs", "-1", "warmup_epochs must be >= 0"),
    ("mixup", "-1", "mixup must be >= 0"),
    ("cutmix", "nan", "cutmix must be a finite number >= 0"),
    ("color_jitter", "-0.3", "color_jitter must be >= 0"),
    ("scale", "0.5,0.2", "scale must be two numbers 0 < lo <= hi <= 1"),
    ("scale", "0,1", "scale must be two numbers"),
    ("scale", "0.5", "scale must be two numbers"),
    ("scale", "0.1,nan", "scale must be two numbers"),
    ("seed", "-1", "seed must be in [0, 4294967295]"),
    ("checkpoint_interval", "-5", "checkpoint_interval must be >= 0"),
    ("eval_interval", "0", "eval_interval must be >= 1"),
    ("log_interval", "0", "log_interval must be >= 1"),
    ("model_kwargs", "{img_size: 64}", "model_kwargs must be free of img_size (use --img-size)"),
    ("model_kwargs", "{num_classes: 3}", "model_kwargs must be free of num_classes"),
    ("model_kwargs", "{depth: [2", "model_kwargs: malformed YAML"),
    ("model_kwargs", "{patch_size:8}", "'patch_size:8' has none (write 'name: value', with a space"),
    ("opt", "adam w", "opt must be a name"),
    ("sched", "", "sched must be a name of letters"),
    ("model", " ", "model must be a non-empty text"),
    ("data", "", "data must be a non-empty text"),
    ("epochs", "yes", "epochs: cannot read 'yes' as int"),
    ("epochs", "1e400", "epochs: cannot read '1e400' as int"),
    # sarvit pretrain
    ("global_crops_scale", "0.5,0.2", "global_crops_scale must be two numbers 0 < lo <= hi <= 1"),
    ("local_crops_scale", "0,0.4", "local_crops_scale must be two numbers"),
    ("local_crops_number", "-1", "local_crops_number must be >= 0"),
    ("local_crop_size", "0", "local_crop_size must be >= 1"),
    ("out_dim", "0", "out_dim must be >= 1"),
    ("warmup_teacher_temp", "0", "warmup_teacher_temp must be > 0"),
    ("teacher_temp", "-0.04", "teacher_temp must be > 0"),
    ("warmup_teacher_temp_epochs", "-1", "warmup_teacher_temp_epochs must be >= 0"),
    ("momentum_teacher", "1.5", "momentum_teacher must be in [0, 1]"),
    ("freeze_last_layer", "-1", "freeze_last_layer must be >= 0"),
    ("weight_decay_end", "-0.4", "weight_decay_end must be >= 0 or none"),
    ("moco_dim", "0", "moco_dim must be >= 1"),
    ("moco_mlp_dim", "0", "moco_mlp_dim must be >= 1"),
    ("moco_t", "0", "moco_t must be > 0"),
    ("moco_m", "nan", "moco_m must be a finite number in [0, 1]"),
    ("moco_min_crop", "0", "moco_min_crop must be in (0, 1]"),
    # sarvit linprobe
    ("n_last_blocks", "0", "n_last_blocks must be >= 1"),
    # sarvit detect / segment
    ("dense_size", "16", "dense_size must be in [32, 4096]; got 16"),
    ("dense_size", "5000", "dense_size must be in [32, 4096]"),
    ("dense_channels", "0", "dense_channels must be >= 1"),
    ("dense_rois", "0", "dense_rois must be >= 1"),
    ("warmup_steps", "-1", "warmup_steps must be >= 0"),
]

# the command whose options these are (the others are sarvit train's)
COMMAND_OF = {**{name: "pretrain" for name in task_fields("dino") if name not in task_fields("supervised")},
              **{name: "mocov3" for name in task_fields("mocov3") if name not in task_fields("supervised")},
              **{name: "linprobe" for name in task_fields("linprobe") if name not in task_fields("supervised")},
              **{name: "detect" for name in task_fields("detect") if name not in task_fields("supervised")}}


@pytest.mark.parametrize("option,value,message", BAD_VALUES)
def test_every_bad_value_is_refused_naming_the_option(option, value, message):
    command = COMMAND_OF.get(option, "train")
    task = {"pretrain": {"task": "dino"}, "mocov3": {"task": "mocov3"}, "linprobe": {"pretrained": "run"}, "detect": {"pretrained": "run"}}.get(command, {})
    with pytest.raises(ConfigError) as caught:
        load_config(None, {option: value, **task}, command="pretrain" if command == "mocov3" else command)
    assert message in str(caught.value)
    assert str(caught.value).startswith(option)


def test_the_bad_value_table_covers_every_number_option():
    """A new numeric field without a range would pass anything: the table must grow with it."""
    numeric = {("lambda" if n == "lambda_" else n) for n in FIELDS
               if "int" in str(FIELDS[n].type) or "float" in str(FIELDS[n].type) or n == "scale"}
    assert numeric - {option for option, _, _ in BAD_VALUES} == set()


def test_every_field_but_switches_declares_what_it_admits():
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        check_field(name, getattr(defaults, name))  # the default itself is admitted
        if f.type != "bool":
            rule = RULES[name]
            assert (rule.range, rule.choices, rule.check) != (None, None, None), name


@pytest.mark.parametrize("option,value", [
    ("clip_grad", "none"), ("clip_grad", "0.5"), ("crop_pct", "1"), ("hflip", "0"), ("hflip", "1"),
    ("auto_augment", "augmix-m5-w4-d2"), ("auto_augment", "original-mstd0.5"), ("auto_augment", "none"),
    ("auto_augment", "rand-m9-n3-mstd101-mmax12-inc0-p0.5-t3aw"), ("device", "cuda:1"), ("device", "mps"),
    ("interpolation", "lanczos"), ("model_ema_decay", "0.9999"), ("seed", "4294967295"), ("lr", "none"),
])
def test_good_values_pass(option, value):
    load_config(None, {option: value})


def test_malformed_recipe_yaml_names_the_file_and_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("epochs: 3\nmodel_kwargs: {depth: 2\nlr: 0.1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(recipe)
    message = str(caught.value)
    assert message.startswith(str(recipe)) and "line 3" in message and "fix the recipe" in message
    recipe.write_text("- epochs\n- 3\n")
    with pytest.raises(ConfigError, match="a recipe is a YAML mapping"):
        load_config(recipe)


def test_validate_imports_neither_torch_nor_timm():
    import subprocess
    import sys

    code = ("import sys; from sarvit.config import load_config; load_config('fashion_mnist_cpu', {'lr': '0.1'}); "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the checks that need timm ------------------------------------------------------------------

TINY = {"model": "vit_tiny_patch16_224", "img_size": "32",
        "model_kwargs": "{patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}"}


@pytest.mark.parametrize("overrides,message", [
    ({"opt": "adamwx"}, "opt 'adamwx' is not a timm optimizer; did you mean adamw"),
    ({"sched": "cosin"}, "sched 'cosin'"),
    ({"sched": "plateau"}, "steps the schedule every optimizer step"),
    ({"sched": "none"}, "sched 'none' makes no schedule"),
    ({"model": "resnet18"}, "SAR supports these families: timm VisionTransformer"),
    ({"model": "vit_tiny_patch16_22"}, "unknown model 'vit_tiny_patch16_22'"),
    ({"img_size": "30"}, "img_size 30 is not a multiple of the patch size 8x8"),
    ({"model_kwargs": "{patch_size: 8, depht: 2}"}, "does not accept these arguments"),
    ({"data": "no_such_dataset"}, "data 'no_such_dataset' is neither a dataset name"),
])
def test_validate_with_libraries_refuses_what_timm_refuses(overrides, message):
    cfg = load_config(None, {**TINY, **overrides})  # passes the library-free checks
    with pytest.raises(ConfigError if overrides.get("model") != "resnet18" else TypeError) as caught:
        validate_with_libraries(cfg)
    assert message in str(caught.value)


def test_validate_with_libraries_accepts_the_shipped_recipes_and_reads_auto_augment_with_timm():
    from sarvit.config import _check_auto_augment_with_timm

    for name in ("fashion_mnist_cpu", "vit_s16_in100_100ep"):
        cfg = load_config(name)
        assert validate_with_libraries(cfg) is cfg
    with pytest.raises(ConfigError, match="auto_augment 'rand-zz1': timm cannot read it"):
        _check_auto_augment_with_timm("rand-zz1", 32)  # past the grammar check, timm's parser is the judge


@pytest.mark.parametrize("line,message", [
    ("bogus_key: 1", "unknown option 'bogus_key'"),
    ("lambda: .nan", "lambda must be a finite number >= 0; got nan"),
    ("epochs: [3]", "epochs: cannot read [3] as int"),
])
def test_a_recipes_mistakes_name_the_recipe(tmp_path, line, message):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"epochs: 3\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(recipe)
    assert str(caught.value).startswith(f"{recipe}: ") and message in str(caught.value)
    if not line.startswith("bogus"):  # a value the command line replaces is not the recipe's to answer for
        option = line.split(":")[0]
        assert getattr(load_config(recipe, {option: "5"}), "lambda_" if option == "lambda" else option) == 5


@pytest.mark.parametrize("command", ["detect", "segment", "linprobe", "pretrain"])
def test_an_odd_batch_is_refused_only_where_mixup_pairs_samples(command):
    options = {"batch_size": 3, "pretrained": "weights.safetensors"} if command != "pretrain" else {
        "batch_size": 3, "task": "dino"}
    assert load_config(None, options, command=command).batch_size == 3  # Mixup is sarvit train's only
    with pytest.raises(ConfigError, match="batch_size must be even, got 3"):
        load_config(None, {"batch_size": 3})


@pytest.mark.parametrize("command,data", [("detect", "voc2007"), ("segment", "voc2012")])
def test_dense_defaults_are_appendix_e3(command, data):
    """E.3: 25 epochs, AdamW, lr 1e-4, a linear warm-up of 250 iterations, 512x512 inputs, batch 8."""
    cfg = load_config(None, {"pretrained": "weights.safetensors"}, command=command)
    assert (cfg.epochs, cfg.opt, cfg.lr, cfg.warmup_steps, cfg.dense_size, cfg.batch_size, cfg.data) == (
        25, "adamw", 1e-4, 250, 512, 8, data)
