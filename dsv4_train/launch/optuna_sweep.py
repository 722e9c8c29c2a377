"""Optuna sweeps that resume: hydra-optuna-sweeper, with the study counted before it runs.

`hydra/sweeper=dsv4_optuna` (conf/hydra/sweeper/dsv4_optuna.yaml) is hydra-optuna-sweeper's TPE
search with its study stored in the sweep directory (SQLite). The plugin itself runs `n_trials` NEW
trials on every invocation and numbers jobs from 0, so re-running a sweep would redo the budget and
write new trials into the old trials' run directories. This subclass (the only hand-written part)
first reads the study: `n_trials` becomes the total budget (finished trials count against it), a
trial left RUNNING by a killed sweep is marked failed and run again as a new trial, job numbers
continue after the last trial, and the sampler is re-seeded from its seed and the number of recorded
trials (`sampler_seeded_after`): re-created with the sweep's own seed, its random start-up trials
would repeat the parameters of the trials already run.
Each trial's task returns its objective (train/objective.py); NaN for a failed or diverged run.
The plugin cannot record a NaN with optuna 2.x (`study.tell` refuses it, and again in the plugin's
own error handler, which stops the sweep), so such a return reaches the plugin as a value that
`float()` refuses: the plugin's path for a trial without a number, which records it as failed and
goes on. A sweep whose every trial failed ends normally too (the plugin asks for the best trial).
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "FAIL", "PRUNED")


class NoObjective:
    """A trial's return value when its run has no finite objective (see result.json for why)."""

    def __init__(self, job_dir: str):
        self.job_dir = job_dir

    def __float__(self) -> float:
        raise ValueError(f"no objective: see {self.job_dir}/result.json")

    def __repr__(self) -> str:
        return f"no objective (failed or diverged: {self.job_dir}/result.json)"


def mark_runs_without_objective(returns) -> None:
    """Replace NaN objectives of completed jobs by NoObjective (in place)."""
    from hydra.core.utils import JobStatus

    for ret in returns:
        value = ret._return_value  # not .return_value: that raises a failed job's exception
        if ret.status == JobStatus.COMPLETED and isinstance(value, float) and math.isnan(value):
            ret.return_value = NoObjective(ret.working_dir)


def sampler_seeded_after(seed, n_recorded: int):
    """The seed of a sampler that resumes a study holding `n_recorded` trials: `seed` itself for a new
    study, else a value derived from both (numpy's SeedSequence), the same on every re-run of the same
    sweep state, and different from `seed` so that the start-up draws do not repeat the first trials'.
    None (an unseeded sampler) stays None."""
    if seed is None or n_recorded == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(n_recorded)]).generate_state(1)[0])


def reseeded_sampler(sampler_cfg, n_recorded: int):
    """A new sampler from its config (hydra.sweeper.sampler) with seed sampler_seeded_after(...);
    None when the sampler takes no seed (e.g. GridSampler: its grid order does not repeat trials)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    if sampler_cfg is None or "seed" not in sampler_cfg or OmegaConf.select(sampler_cfg, "seed") is None:
        return None
    return instantiate(sampler_cfg, seed=sampler_seeded_after(sampler_cfg.seed, n_recorded))


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
                sampler = reseeded_sampler(self.config.hydra.sweeper.get("sampler"), len(trials))
                if sampler is not None:
                    self.sampler = sampler
                log.info(f"resuming study {self.study_name}: {done} trials done, {self.n_trials} to go")
                if self.n_trials == 0:
                    print(f"sweep already complete: {done} of n_trials={budget} trials done "
                          f"(raise hydra.sweeper.n_trials to run more)", flush=True)
                    return None
            launch = self.launcher.launch

            def launch_marking_failures(job_overrides, initial_job_idx):
                returns = launch(job_overrides, initial_job_idx)
                mark_runs_without_objective(returns)
                return returns

            self.launcher.launch = launch_marking_failures
            try:
                return super().sweep(arguments)
            except ValueError:  # the plugin's final `study.best_trial` when no trial completed
                study = optuna.load_study(study_name=self.study_name, storage=self.storage)
                states = {t.state.name for t in study.get_trials(deepcopy=False)}
                if "COMPLETE" in states or "RUNNING" in states:  # not that: an error of its own
                    raise
                print(f"sweep finished without a completed trial: all {len(study.trials)} failed or diverged "
                      "(their result.json say why; python -m dsv4_train.report SWEEP_DIR)", flush=True)
                return None

    return ResumableOptunaSweeperImpl
