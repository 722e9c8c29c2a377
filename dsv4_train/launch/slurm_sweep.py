"""Hydra sweeps on Slurm: hydra-submitit-launcher's SlurmLauncher, checked before it submits.

Selected with `hydra/launcher=dsv4_slurm` (conf/hydra/launcher/dsv4_slurm.yaml), whose target is
`hydra_plugins.dsv4_slurm_launcher.CheckedSlurmLauncher` (Hydra instantiates launchers only from the
`hydra_plugins` namespace; that class is this module's `CheckedSlurmLauncherBase`). Each sweep point
becomes one Slurm job of `nodes` x `tasks_per_node` tasks (one per GPU); submitit runs the Hydra job
once per task and `dsv4_train/launch/env.py` finds the rank from SLURM_*. Before anything is
submitted, every sweep point's config is validated for that world size, so a layout that does not
fit fails on the login node with one message instead of N queued jobs failing later.

hydra-submitit-launcher is an optional extra (`pip install 'dsv4-train[slurm]'`); without it,
`--cfg job` / `--cfg hydra` still compose, and launching raises ValueError naming the extra.

Preemption: the training loop's PreemptionWatcher replaces submitit's USR2/SIGTERM handlers, saves,
and requeues the job with `scontrol requeue`; the requeued job reruns the same pickled Hydra job,
whose run.dir is the same sweep subdirectory, so it resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Sequence

from omegaconf import open_dict

EXIT_LAUNCH_ERROR = 2

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SlurmLauncher

    HAVE_SUBMITIT = True
except ImportError:  # the optional extra is not installed
    from hydra.plugins.launcher import Launcher as _SlurmLauncher  # type: ignore[assignment]

    HAVE_SUBMITIT = False


def check_sweep_world_size(job_configs: Sequence[Any], *, nodes: int, tasks_per_node: int) -> None:
    """Validate each composed job config (DictConfig, hydra node allowed) for nodes x tasks_per_node.

    Raises ValueError naming the sweep point and every problem.
    """
    from dsv4_train.config.errors import friendly_message
    from dsv4_train.config.load import to_typed
    from dsv4_train.config.validate import validate

    world_size = nodes * tasks_per_node
    for index, job_cfg in enumerate(job_configs):
        cfg = copy.deepcopy(job_cfg)  # keeps the structured type that to_typed() needs
        with open_dict(cfg):
            cfg.pop("hydra", None)
        try:
            validate(to_typed(cfg), world_size=world_size)
        except ValueError as exc:
            raise ValueError(
                f"hydra/launcher=dsv4_slurm: sweep job #{index} does not fit hydra.launcher.nodes={nodes} x "
                f"hydra.launcher.tasks_per_node={tasks_per_node} = {world_size} processes (one per GPU); "
                f"nothing was submitted. Fix the launcher sizes or the layout.\n{friendly_message(exc)}"
            ) from None


class CheckedSlurmLauncherBase(_SlurmLauncher):  # type: ignore[misc,valid-type]
    """SlurmLauncher that validates every sweep point for the job's world size before submitting."""

    def __new__(cls, **params: Any):
        if not HAVE_SUBMITIT:  # before object.__new__, which refuses the abstract fallback base
            raise ValueError(
                "hydra/launcher=dsv4_slurm needs hydra-submitit-launcher, an optional extra: install it "
                "with `pip install 'dsv4-train[slurm]'` (or `pip install hydra-submitit-launcher`)."
            )
        return super().__new__(cls)

    def __init__(self, **params: Any) -> None:
        if params.get("tasks_per_node") != params.get("gpus_per_node") and params.get("gpus_per_node"):
            raise ValueError(
                f"hydra.launcher.tasks_per_node={params.get('tasks_per_node')} but "
                f"hydra.launcher.gpus_per_node={params.get('gpus_per_node')}: dsv4-train runs one task per "
                "GPU; set both to the number of GPUs per node."
            )
        super().__init__(**params)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        assert self.config is not None and self.hydra_context is not None
        loader = self.hydra_context.config_loader
        configs = [loader.load_sweep_config(self.config, list(overrides)) for overrides in job_overrides]
        try:
            check_sweep_world_size(
                configs, nodes=int(self.params["nodes"]), tasks_per_node=int(self.params["tasks_per_node"])
            )
        except ValueError as exc:  # one message and exit 2, not Hydra's traceback report
            print(f"dsv4-train: launch error: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_LAUNCH_ERROR) from None
        return super().launch(job_overrides, initial_job_idx)
