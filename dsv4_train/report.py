"""`python -m dsv4_train.report SWEEP_DIR`: what a sweep found, as a table, files and plots.

Reads every job directory of a Hydra multirun or Optuna sweep (also a partial one: a job without
`result.json` is listed as `incomplete`), prints a table sorted by objective (best first; the
overrides that differ between jobs, objective, final lm_loss, tokens/s, status) and writes
`report.md`, `report.csv`, `loss_curves.png` (every job's lm_loss per step on one chart) and one
`objective_vs_<key>.png` per swept numeric key (log scale when its values span a decade or more).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

from dsv4_train.train.objective import read_rows


def _overrides(job: Path) -> Dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    import yaml

    items = yaml.safe_load(path.read_text()) or []
    return dict(item.split("=", 1) for item in items if "=" in item and not item.startswith("hydra"))


def collect(sweep_dir: Path) -> List[dict]:
    jobs = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        rows = read_rows(str(job))
        result_path = job / "result.json"
        if not rows and not result_path.exists() and not (job / ".hydra").is_dir():
            continue  # not a job directory; a job that has not logged a step yet is listed as incomplete
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        tail = [r["tokens_per_sec"] for r in rows[-10:] if isinstance(r.get("tokens_per_sec"), (int, float))]
        jobs.append({
            "job": job.name,
            "overrides": _overrides(job),
            "objective": result.get("objective"),
            "metric": result.get("metric"),
            "direction": result.get("direction", "minimize"),
            "final_lm_loss": rows[-1].get("lm_loss") if rows else None,
            "tokens_per_sec": sum(tail) / len(tail) if tail else None,
            "status": result.get("status", "incomplete"),
            "reason": result.get("reason"),
            "curve": [(r["step"], r["lm_loss"]) for r in rows if isinstance(r.get("lm_loss"), (int, float))
                      and math.isfinite(r["lm_loss"])],
        })
    return jobs


def _sort_key(job: dict):
    value = job["objective"]
    if value is None:
        return (1, 0.0)
    return (0, -value if job["direction"] == "maximize" else value)


def _differing(jobs: List[dict]) -> List[str]:
    keys = sorted({k for j in jobs for k in j["overrides"]})
    return [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def table(jobs: List[dict], keys: List[str]) -> List[List[str]]:
    header = ["job", *keys, "objective", "final lm_loss", "tokens/s", "status"]
    body = [[j["job"], *(j["overrides"].get(k, "") for k in keys), _fmt(j["objective"], ".5g"),
             _fmt(j["final_lm_loss"], ".4f"), _fmt(j["tokens_per_sec"], ",.0f"), j["status"]] for j in jobs]
    return [header, *body]


def _as_number(text: Optional[str]) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def x_scale(values) -> str:
    """'log' when the swept values are positive and span a decade or more (a learning rate), else
    'linear'."""
    return "log" if min(values) > 0 and max(values) / min(values) >= 10 else "linear"


def plots(jobs: List[dict], keys: List[str], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for job in jobs:
        if job["curve"]:
            steps, losses = zip(*job["curve"])
            label = f"{job['job']}: " + ", ".join(f"{k}={job['overrides'].get(k)}" for k in keys)
            ax.plot(steps, losses, label=label[:60])
    ax.set_xlabel("step")
    ax.set_ylabel("lm_loss")
    ax.set_title("training loss of every run")
    if len(jobs) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / "loss_curves.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    for key in keys:
        points = [(_as_number(j["overrides"].get(key)), j["objective"]) for j in jobs]
        points = [(x, y) for x, y in points if x is not None and y is not None and math.isfinite(y)]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        xs, ys = zip(*points)
        ax.scatter(xs, ys)
        ax.set_xscale(x_scale(xs))
        ax.set_xlabel(key)
        ax.set_ylabel(f"objective ({jobs[0]['metric'] or 'objective'})")
        ax.set_title(f"objective vs {key}")
        fig.tight_layout()
        written.append(out / f"objective_vs_{key.replace('/', '_')}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_report(sweep_dir: Path) -> dict:
    jobs = sorted(collect(sweep_dir), key=_sort_key)
    if not jobs:
        raise ValueError(f"{sweep_dir} holds no job directories with metrics.jsonl or result.json; give the "
                         "directory of a multirun or Optuna sweep (hydra.sweep.dir).")
    keys = _differing(jobs)
    rows = table(jobs, keys)
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    md = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    images = plots(jobs, keys, sweep_dir)
    best = jobs[0]
    notes = [f"- job {j['job']}: {j['status']} ({j['reason']})" for j in jobs if j["status"] != "ok" and j["reason"]]
    (sweep_dir / "report.md").write_text(
        f"# Sweep report: {sweep_dir}\n\n{len(jobs)} runs, sorted by objective "
        f"({best['metric'] or 'objective'}, {best['direction']}); best: job {best['job']}.\n\n"
        + "\n".join(md) + "\n\n" + ("\n".join(notes) + "\n\n" if notes else "")
        + "".join(f"![{p.stem}]({p.name})\n" for p in images)
    )
    return {"text": text, "jobs": jobs, "images": images}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4_train.report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"dsv4-train report: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        report = write_report(args.sweep_dir)
    except ValueError as error:
        print(f"dsv4-train report: {error}", file=sys.stderr)
        return 2
    print(report["text"])
    print(f"\nwrote {args.sweep_dir / 'report.md'}, report.csv and {len(report['images'])} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
