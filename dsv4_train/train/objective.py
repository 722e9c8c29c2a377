"""What a finished run reports: its objective (`run.objective`) and `result.json`.

The objective is computed from the run's own `metrics.jsonl`, so anyone can recompute it: `val_*`
metrics (evaluations) count by their final value, per-step metrics by the mean of the last
`last_n` logged steps. `result.json` (rank 0, atomically) holds the status (`ok`, `diverged`: stopped
on non-finite values, `preempted`, `failed` with the error), the objective, the final metrics, the
tokens seen and the wall time. A sweep task gets NaN for a run without a finite objective, which
Optuna records as a failed trial while the sweep goes on.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from typing import Callable, List, Optional

PER_STEP_METRICS = ("lm_loss", "mtp_loss", "grad_norm", "tokens_per_sec", "model_tflops", "moe_load_imbalance")
EVAL_METRICS = ("val_loss", "val_mtp_loss")


def resolve_metric(cfg) -> str:
    metric = cfg.run.objective.metric
    if metric == "auto":
        return "val_loss" if cfg.train.eval_iters > 0 else "lm_loss"
    return metric


def objective_from_rows(rows: List[dict], *, metric: str, last_n: int) -> Optional[float]:
    """The objective of a run with these metrics.jsonl rows (None when it has no such value)."""
    if metric in EVAL_METRICS:
        values = [r[metric] for r in rows if metric in r]
        return float(values[-1]) if values else None
    values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float)) and not r.get("skipped")]
    if not values:
        return None
    tail = values[-last_n:]
    return float(sum(tail) / len(tail))


def read_rows(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def record_run(cfg, run: Callable[[], int], *, is_main: bool):
    """Run `run()` (returns an exit code); write result.json; return (exit code, objective or nan).
    An exception is recorded as `failed` and re-raised."""
    from dsv4_train.launch.preemption import EXIT_PREEMPTED
    from dsv4_train.train.checkpointer import EXIT_SAVE_FAILED
    from dsv4_train.train.nonfinite import EXIT_NONFINITE

    started = time.monotonic()
    status, reason, code = "ok", None, 1
    try:
        code = run()
        if code == EXIT_NONFINITE:
            status, reason = "diverged", "stopped on non-finite loss or gradients (see logs/rank_0.log)"
        elif code == EXIT_SAVE_FAILED:
            status, reason = "failed", "a checkpoint could not be written (see logs/rank_0.log)"
        elif code == EXIT_PREEMPTED:
            status, reason = "preempted", "stopped on a signal after saving; run the same command to resume"
        elif code:
            status, reason = "failed", f"exit code {code}"
    except BaseException as error:
        status, reason = "failed", f"{type(error).__name__}: {error}".strip()
        if is_main:
            _write(cfg, status, reason, started, traceback_text=traceback.format_exc(limit=3))
        raise
    objective = _write(cfg, status, reason, started) if is_main else None
    return code, (objective if objective is not None else math.nan)


def _write(cfg, status: str, reason: Optional[str], started: float, traceback_text: Optional[str] = None):
    rows = read_rows(cfg.run.dir)
    metric = resolve_metric(cfg)
    objective = objective_from_rows(rows, metric=metric, last_n=cfg.run.objective.last_n)
    if status != "ok":
        objective = None  # an unfinished, diverged or failed run ranks nowhere
    elif objective is not None and not math.isfinite(objective):
        status, reason = ("diverged", reason or f"{metric} is not finite") if status == "ok" else (status, reason)
        objective = None
    final = rows[-1] if rows else {}
    tokens, consumed = 0, 0
    for row in rows:  # each step's samples times its sequence length (staged runs change it)
        samples = int(row.get("consumed_samples", consumed))
        tokens += (samples - consumed) * int(row.get("seq_length", cfg.train.seq_length))
        consumed = samples
    result = {
        "status": status,
        "reason": reason,
        "objective": objective,
        "metric": metric,
        "direction": cfg.run.objective.direction,
        "last_n": cfg.run.objective.last_n,
        "steps": final.get("step", 0),
        "tokens_seen": tokens,
        "final_metrics": final,
        "wall_time_s": time.monotonic() - started,
    }
    if traceback_text:
        result["traceback"] = traceback_text
    os.makedirs(cfg.run.dir, exist_ok=True)
    tmp = os.path.join(cfg.run.dir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, os.path.join(cfg.run.dir, "result.json"))
    return objective
