"""Optuna sweeps that resume: hydra-optuna-sweeper, with the study counted before it runs.

`hydra/sweeper=dsv4_optuna` (conf/hydra/sweeper/dsv4_optuna.yaml) is hydra-optuna-sweeper's TPE
search with its study stored in the sweep directory (SQLite). The plugin itself runs `n_trials` NEW
trials on every invocation and numbers jobs from 0, so re-running a sweep would redo the budget and
write new trials into the old trials' run directories. This subclass (the only hand-written part)
first reads the study: `n_trials` becomes the total budget (finished trials count against it), a
trial left RUNNING by a killed sweep is marked failed and run again as a new trial, and job numbers
continue after the last trial.
Each trial's task returns its objective (train/objective.py); NaN for a failed or diverged run,
which Optuna records as a failed trial while the sweep continues.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "FAIL", "PRUNED")


def resumable_impl_class():
    """OptunaSweeperImpl with resume (imported lazily: the sweep extra is optional)."""
    import optuna
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    class ResumableOptunaSweeperImpl(OptunaSweeperImpl):
        def sweep(self, arguments):
            import os

            os.makedirs(str(self.config.hydra.sweep.dir), exist_ok=True)  # the SQLite study lives there
            budget = self.n_trials
            try:
                study = optuna.load_study(study_name=self.study_name, storage=self.storage)
            except KeyError:  # no study yet: a fresh sweep
                study = None
            if study is not None:
                trials = study.get_trials(deepcopy=False)
                # Finished trials (diverged and failed ones included) count against the budget; a
                # trial its killed sweep left RUNNING does not: it is marked failed and replaced.
                done = sum(1 for t in trials if t.state.name in FINISHED)
                for trial in trials:
                    if trial.state == optuna.trial.TrialState.RUNNING:
                        study._storage.set_trial_state(trial._trial_id, optuna.trial.TrialState.FAIL)
                self.n_trials = max(budget - done, 0)
                self.job_idx = len(trials)
                log.info(f"resuming study {self.study_name}: {done} trials done, {self.n_trials} to go")
                if self.n_trials == 0:
                    print(f"sweep already complete: {done} of n_trials={budget} trials done "
                          f"(raise hydra.sweeper.n_trials to run more)", flush=True)
                    return None
            return super().sweep(arguments)

    return ResumableOptunaSweeperImpl
