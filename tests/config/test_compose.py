"""Composition of every recipe and model, override precedence, struct-mode errors."""

import dataclasses

import pytest
import yaml
from omegaconf import OmegaConf

from dsv4_train.config.errors import friendly_message
from dsv4_train.config.load import CONFIG_DIR, available_recipes, compose
from dsv4_train.config.model import ModelConfig
from dsv4_train.config.schema import Config
from dsv4_train.config.validate import validate


def test_recipes_are_listed():
    assert {"tiny_pretrain", "flash_pretrain", "pro_pretrain"} <= set(available_recipes())


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_composes_and_validates(recipe):
    cfg = compose([f"conf={recipe}", "data.paths=[/data/x]"])
    assert isinstance(cfg, Config)
    validate(cfg, world_size=cfg.parallel.world_size)


def test_default_recipe_is_tiny_pretrain():
    cfg = compose([])
    assert cfg.run.name == "tiny_pretrain" and cfg.model.name == "tiny"
    assert cfg.train.precision == "fp32" and cfg.train.max_steps == 200 and cfg.train.seq_length == 64
    assert 2 <= cfg.train.micro_batch_size <= 4


def test_flash_and_pro_recipes_pick_their_groups():
    flash = compose(["conf=flash_pretrain"])
    assert flash.model.name == "flash" and flash.train.precision == "bf16"
    assert flash.train.seq_length == 4096 and flash.optim.lr == 2.7e-4 and flash.optim.warmup_steps == 2000
    pro = compose(["conf=pro_pretrain"])
    assert pro.model.name == "pro" and pro.optim.lr == 2.0e-4 and pro.optim.min_lr == 2.0e-5
    assert pro.parallel.world_size > flash.parallel.world_size


def test_released_compress_ratios():
    flash = compose(["model=flash"]).model
    assert flash.compress_ratios == [0, 0] + [4, 128] * 20 + [4, 0]
    assert len(flash.compress_ratios) == flash.num_layers + flash.mtp_num_layers == 44
    pro = compose(["model=pro"]).model
    assert pro.compress_ratios == [128, 128] + [4, 128] * 29 + [4, 0]
    assert len(pro.compress_ratios) == pro.num_layers + pro.mtp_num_layers == 62


def test_override_precedence():
    # command line beats the recipe, which beats the group option, which beats the schema default
    assert compose(["conf=tiny_pretrain"]).optim.lr == 3.0e-3  # recipe over optim/adamw_cosine (3e-4)
    assert compose(["conf=tiny_pretrain", "optim.lr=0.5"]).optim.lr == 0.5
    # a group override on the command line is applied, then the recipe's own values on top
    cfg = compose(["conf=tiny_pretrain", "optim=v4_flash"])
    assert cfg.optim.decay_style == "wsd" and cfg.optim.lr == 3.0e-3
    # a recipe-level group choice can be overridden from the command line
    assert compose(["conf=flash_pretrain", "model=tiny"]).model.name == "tiny"
    # schema default survives when nothing sets it
    assert compose([]).model.hash_table_seed == ModelConfig().hash_table_seed


def _hydra_section(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None, job_name="dsv4"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True).hydra


def test_a_recipes_hydra_settings_win_over_the_primary_config():
    # conf/config.yaml lists _self_ before the recipe: recipes/tiny_lr_sweep.yaml's fixed sweep dir
    # (where a re-run finds its Optuna study) beats config.yaml's timestamped default ...
    assert _hydra_section(["conf=tiny_lr_sweep"]).sweep.dir == "multirun/tiny_lr_sweep"
    # ... the command line beats the recipe, and a recipe that sets none keeps the default
    assert _hydra_section(["conf=tiny_lr_sweep", "hydra.sweep.dir=elsewhere"]).sweep.dir == "elsewhere"
    assert _hydra_section(["conf=tiny_pretrain"]).sweep.dir.startswith("multirun/tiny_pretrain/20")


@pytest.mark.parametrize("name", ["tiny", "flash", "pro"])
def test_model_yaml_round_trips(name):
    with open(f"{CONFIG_DIR}/model/{name}.yaml") as f:
        raw = yaml.safe_load(f)
    yarn = raw.pop("yarn")
    from dsv4_train.config.model import YarnConfig

    model = ModelConfig(**raw, yarn=YarnConfig(**yarn))
    assert compose([f"model={name}"]).model == model
    back = OmegaConf.to_object(OmegaConf.structured(dataclasses.asdict(model)))
    assert ModelConfig(**{**back, "yarn": YarnConfig(**back["yarn"])}) == model


def test_run_dir_falls_back_without_hydra_runtime():
    assert compose(["conf=flash_pretrain"]).run.dir == "runs/flash_pretrain"
    assert compose(["run.name=abc"]).run.dir == "runs/abc"
    assert compose(["run.dir=/tmp/x"]).run.dir == "/tmp/x"


BAD = [
    (["model.hidden_sise=8"], ["model.hidden_sise", "model.hidden_size"]),
    (["train.max_steps=abc"], ["train.max_steps", "Integer"]),
    (["conf=no_such_recipe"], ["conf=no_such_recipe", "tiny_pretrain"]),
    (["model=huge"], ["model=huge", "flash"]),
    (["+foo=1"], ["foo", "not a field"]),
    (["+model.hiden_size=3"], ["model.hiden_size", "model.hidden_size"]),
    (["model.compress_ratios=[a]"], ["model.compress_ratios", "Integer"]),
    (["conf=tiny_pretrain,flash_pretrain"], ["--multirun"]),
    (["garbage"], ["garbage", "key=value"]),
]


@pytest.mark.parametrize("overrides,needles", BAD)
def test_compose_errors_are_one_clear_paragraph(overrides, needles):
    with pytest.raises(Exception) as info:
        compose(overrides)
    msg = friendly_message(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    for needle in needles:
        assert needle in msg, msg
