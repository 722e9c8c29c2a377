"""Hydra discovers launchers only inside the `hydra_plugins` namespace package: this is where
`hydra/launcher=dsv4_slurm` finds dsv4-train's checked Slurm launcher. The logic lives in
`dsv4_train/launch/slurm_sweep.py`."""

from dsv4_train.launch.slurm_sweep import CheckedSlurmLauncherBase


class CheckedSlurmLauncher(CheckedSlurmLauncherBase):
    """hydra-submitit-launcher's SlurmLauncher, validating every sweep point before submitting."""
