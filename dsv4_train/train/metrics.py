"""Where step metrics go: one console line per logging interval, `metrics.jsonl`, optional wandb.

`metrics.jsonl` (one JSON object per step) is the source of truth; wandb is an optional sink,
imported lazily on rank 0 only, offline unless the user configured otherwise.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, Optional

from dsv4_train.config.schema import LoggingConfig
from dsv4_train.launch.sweep import wandb_group


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def console_line(metrics: Dict[str, float], *, max_steps: int, eta_s: float, num_stages: int = 1) -> str:
    def number(key: str, fmt: str) -> str:
        value = metrics.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    stage = (
        f"stage {metrics['stage']}/{num_stages} seq {metrics.get('seq_length')} {metrics.get('indexer_phase')} | "
        if num_stages > 1 and "stage" in metrics else ""
    )
    return stage + (
        f"step {metrics['step']:>6d}/{max_steps} | lm_loss {number('lm_loss', '.4f')} | "
        f"mtp_loss {number('mtp_loss', '.4f')} | grad_norm {number('grad_norm', '.3f')} | "
        f"lr {number('lr', '.3e')} | tok/s {number('tokens_per_sec', ',.0f')} | "
        + (f"TFLOP/s {number('model_tflops', '.3g')} | " if "model_tflops" in metrics else "")
        + (f"MFU {100 * metrics['mfu']:.1f}% | " if metrics.get("mfu") is not None else "")
        + (f"load {number('moe_load_imbalance', '.2f')} | " if "moe_load_imbalance" in metrics else "")
        + (f"val_loss {number('val_loss', '.4f')} | " if "val_loss" in metrics else "")
        + f"ETA {format_duration(eta_s)}"
    )


class MetricsSink:
    """Writes metrics on the main rank; a no-op elsewhere."""

    def __init__(self, *, run_dir: str, logging_cfg: LoggingConfig, is_main: bool, config_dict: dict, max_steps: int,
                 num_stages: int = 1, resume_step: int = 0):
        self.is_main = is_main
        self.logging_cfg = logging_cfg
        self.max_steps = max_steps
        self.num_stages = num_stages
        self._jsonl = None
        self._wandb_run = None
        self._start = time.monotonic()
        self._first_step: Optional[int] = None
        if not is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        # A resumed run continues the same file from its checkpoint's step: rows of steps after it
        # (logged before a crash, and about to be trained again) are dropped first.
        truncate_after(path, resume_step)
        self._jsonl = open(path, "a", buffering=1)
        if logging_cfg.wandb and logging_cfg.wandb_mode != "disabled":
            import wandb  # optional dependency, imported only when asked for

            self._wandb_run = wandb.init(
                project=logging_cfg.wandb_project,
                group=wandb_group(logging_cfg.wandb_group),  # a sweep's runs share one group
                mode=resolve_wandb_mode(logging_cfg.wandb_mode),
                dir=run_dir,
                config=config_dict,
                resume="allow",
                id=_stable_wandb_id(run_dir),
            )

    def log(self, metrics: Dict[str, float], *, print_line: bool) -> None:
        if not self.is_main:
            return
        step = int(metrics["step"])
        remaining = self.max_steps - step
        if self._first_step is None:
            # The first step of a process carries one-off costs (allocator, lazy initialisation, the
            # first batch): the rate is timed from its end, so the ETA is not inflated by them.
            self._first_step, self._start = step, time.monotonic()
            eta = metrics.get("step_time_s", 0.0) * remaining
        else:
            eta = (time.monotonic() - self._start) / (step - self._first_step) * remaining
        self._jsonl.write(json.dumps(metrics, sort_keys=True) + "\n")
        if print_line and self.logging_cfg.console:
            print(console_line(metrics, max_steps=self.max_steps, eta_s=eta, num_stages=self.num_stages), flush=True, file=sys.stdout)
        if self._wandb_run is not None:
            numbers = {k: v for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
            self._wandb_run.log(numbers, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def truncate_after(path: str, step: int) -> None:
    """Keep the rows of steps <= `step` (and any unreadable tail line is dropped), atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(json.dumps(row, sort_keys=True) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def resolve_wandb_mode(mode: str) -> str:
    """`auto`: online only when the user has a wandb API key (env var or `wandb login` netrc entry)."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    try:
        credentials = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        credentials = None
    return "online" if credentials else "offline"


def _stable_wandb_id(run_dir: str) -> str:
    """One wandb run per run directory, so a resumed run continues the same wandb run."""
    import hashlib

    return hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:16]
