"""Check a launch before it starts, and record what was launched.

    python -m dsv4_train.launch.preflight --nodes 2 --procs-per-node 8 [--record DIR] -- conf=... k=v

Composes the config exactly as the entry point will (same overrides), validates it against the world
size the launch will create (nodes x processes per node), and exits 2 with one message on the first
problem, before anything is submitted or spawned. With --record it writes into DIR:

    config.yaml        the composed config, interpolations resolved
    code_version.txt   package version, git commit, branch and `git status --short` of the checkout
    code.diff          uncommitted changes (`git diff HEAD`), when there are any
    command.txt        the overrides, one per line, and the launch's world size

The launch scripts (`launch/torchrun.sh`, `launch/slurm/*`) call it; it is a plain module so it can
also be run by hand.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

EXIT_LAUNCH_ERROR = 2
REPO_ROOT = Path(__file__).resolve().parents[2]


def check_config(overrides: Sequence[str], *, world_size: int):
    """Compose and validate for `world_size` processes; returns the composed DictConfig.

    Raises ValueError (the config layer's ConfigError and friends) naming the problem.
    """
    from dsv4_train.config.load import compose_dict, to_typed
    from dsv4_train.config.validate import validate

    dcfg = compose_dict(list(overrides))
    validate(to_typed(dcfg), world_size=world_size)
    return dcfg


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(
            ["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def code_version() -> tuple[str, str]:
    """(summary text, uncommitted diff) of the code this launch runs."""
    from dsv4_train import __version__

    commit = (_git("rev-parse", "HEAD") or "").strip()
    lines = [f"dsv4_train {__version__}", f"source: {REPO_ROOT}"]
    if not commit:
        lines.append("git: not a git checkout (installed package)")
        return "\n".join(lines) + "\n", ""
    status = _git("status", "--short", "--untracked-files=no") or ""
    lines += [
        f"commit: {commit}",
        f"branch: {(_git('rev-parse', '--abbrev-ref', 'HEAD') or '?').strip()}",
        f"dirty: {'yes' if status.strip() else 'no'}",
    ]
    if status.strip():
        lines += ["changed files:", *("  " + s for s in status.splitlines())]
    diff = (_git("diff", "HEAD") or "") if status.strip() else ""
    return "\n".join(lines) + "\n", diff


def record(directory: Path, dcfg, overrides: Sequence[str], *, world_size: int) -> None:
    from omegaconf import OmegaConf

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(dcfg, resolve=True))
    summary, diff = code_version()
    (directory / "code_version.txt").write_text(summary)
    if diff:
        (directory / "code.diff").write_text(diff)
    (directory / "command.txt").write_text(
        f"# world size {world_size}\n" + "".join(f"{o}\n" for o in overrides)
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4_train.launch.preflight", description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
    parser.add_argument("--procs-per-node", type=int, required=True, help="processes (GPUs) per node")
    parser.add_argument("--record", type=Path, default=None, help="directory to write the launch record into")
    parser.add_argument("--label", default="launch", help="prefix of the error message (the calling script)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as given to `python -m dsv4_train`")
    args = parser.parse_args(argv)
    world_size = args.nodes * args.procs_per_node
    where = f"{args.nodes} node(s) x {args.procs_per_node} process(es) per node = {world_size} processes"
    try:
        if args.nodes < 1 or args.procs_per_node < 1:
            raise ValueError(f"{where}: nodes and processes per node must be positive.")
        dcfg = check_config(args.overrides, world_size=world_size)
    except Exception as exc:  # composition and validation errors: one message, no traceback
        from dsv4_train.config.errors import friendly_message

        print(f"{args.label}: error: the config does not fit this launch ({where}):\n{friendly_message(exc)}",
              file=sys.stderr)
        return EXIT_LAUNCH_ERROR
    if args.record is not None:
        record(args.record, dcfg, args.overrides, world_size=world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
