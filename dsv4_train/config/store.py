"""Registration of the typed schema with Hydra, and the resolvers the YAML files use.

`register()` is idempotent and runs on import of `dsv4_train.config.load`; both the compose API
and the `@hydra.main` entry point go through that module, so the schema is always in place.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from dsv4_train.config.schema import Config

SCHEMA_NAME = "dsv4_config"  # first entry of conf/config.yaml's defaults list
RUN_DIR_FALLBACK_ROOT = "runs"


def hydra_output_dir():
    """The current Hydra job's output dir, or None outside a Hydra run (e.g. the compose API)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    try:
        return HydraConfig.get().runtime.output_dir
    except Exception:  # compose() initialises HydraConfig without a runtime output dir
        return None


def run_dir_resolver(name: str) -> str:
    """${dsv4_run_dir:<run.name>}: the Hydra job's output dir, else runs/<run.name>."""
    return hydra_output_dir() or f"{RUN_DIR_FALLBACK_ROOT}/{name}"


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
    if not OmegaConf.has_resolver("dsv4_run_dir"):
        OmegaConf.register_new_resolver("dsv4_run_dir", run_dir_resolver)
