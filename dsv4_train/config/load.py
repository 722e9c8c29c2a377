"""Composing a typed Config: the compose API for tests and tools, the pieces `@hydra.main` uses,
and the friendly reporting of configuration mistakes.

    from dsv4_train.config.load import CONFIG_DIR, compose, to_typed
    cfg = compose(["conf=flash_pretrain", "parallel.pp=8"])          # -> Config

The entry point (dsv4_train/entry.py) composes a run once with Hydra and types it with `to_typed`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dsv4_train.config.keys import check_known_keys
from dsv4_train.config.schema import Config
from dsv4_train.config.store import register

def _config_dir() -> Path:
    """`<repo>/conf` in a source checkout; the copy packaged as `dsv4_train/_conf` in a wheel (pyproject
    maps it there, recipes included: `conf/conf` is the recipes folder)."""
    checkout = Path(__file__).resolve().parents[2] / "conf"
    return checkout if checkout.is_dir() else Path(__file__).resolve().parents[1] / "_conf"


CONFIG_DIR = str(_config_dir())
RECIPES_DIR = str(_config_dir() / "conf")
CONFIG_NAME = "config"

register()


def compose_dict(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose conf/config.yaml with `overrides` (Hydra override syntax) into a DictConfig."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None, job_name="dsv4"):
        return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))


def to_typed(cfg: DictConfig) -> Config:
    """Resolve interpolations and turn a composed DictConfig into the typed Config dataclass."""
    check_known_keys(cfg, Config)  # to_object would silently accept keys added with '+'
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, Config), type(typed)
    return typed


def compose(overrides: Sequence[str] = ()) -> Config:
    """Compose and type a config: `compose(["conf=flash_pretrain", "train.max_steps=10"])`.

    Without a Hydra runtime, run.dir defaults to runs/<run.name> (relative to the working dir).
    """
    return to_typed(compose_dict(overrides))


def available_recipes() -> List[str]:
    return sorted(p.stem for p in Path(RECIPES_DIR).glob("*.yaml"))
