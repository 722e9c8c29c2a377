"""Hydra discovers sweepers only inside the `hydra_plugins` namespace package: this is where
`hydra/sweeper=dsv4_optuna` finds the resumable Optuna sweeper. The logic lives in
`dsv4_train/launch/optuna_sweep.py`."""

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from dsv4_train.launch.optuna_sweep import resumable_impl_class


class ResumableOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's sweeper whose study resumes (see dsv4_train/launch/optuna_sweep.py)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        old = self.sweeper
        self.sweeper = resumable_impl_class().__new__(resumable_impl_class())
        self.sweeper.__dict__.update(old.__dict__)
