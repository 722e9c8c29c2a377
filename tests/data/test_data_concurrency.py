"""Preparation is safe when several processes start at once on an empty cache (independently, or as ranks)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import VOCAB, data_config, train_config

from dsv4_train.data import build_data

PROBE = Path(__file__).with_name("build_probe.py")


def _env():
    env = dict(os.environ, PYTHONWARNINGS="ignore", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _reference(cache, dp_size):
    """Digests of each rank's micro-batches, computed in this process with a separate cache."""
    out = []
    for rank in range(dp_size):
        data = build_data(data_cfg=data_config(cache), train_cfg=train_config(max_steps=4), vocab_size=VOCAB, seed=11,
                          dp_rank=rank, dp_size=dp_size)
        out.append([hashlib.sha256(b["tokens"].numpy().tobytes() + b["labels"].numpy().tobytes()).hexdigest()
                    for b in data.train_iterator])
    return out


def _no_debris(cache: Path):
    leftovers = [p for p in cache.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    for index_dir in (cache / "indices").iterdir():
        assert (index_dir / ".complete").is_file()


@pytest.mark.slow
def test_independent_processes_share_a_fresh_cache(tmp_path):
    cache, out = tmp_path / "shared_cache", tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, str(PROBE), "--cache", str(cache), "--out", str(out), "--tag", f"-{i}"],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    first, second = (json.loads((out / f"rank0-{i}.json").read_text()) for i in range(2))
    assert first == second == _reference(tmp_path / "reference_cache", 1)[0]
    assert len(list((cache / "tokenizers").iterdir())) == 1
    _no_debris(cache)


@pytest.mark.slow
def test_two_ranks_prepare_collectively_and_read_their_dp_share(tmp_path):
    cache, out = tmp_path / "shared_cache", tmp_path / "out"
    # Own process group, so that a hang (a deadlock never ends by itself) kills torchrun *and* its ranks.
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(PROBE), "--cache", str(cache), "--out", str(out), "--slow-lock"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=120)  # ~10 s normally
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("two ranks preparing the data on a fresh cache did not finish in 120 s (deadlock?)")
    assert proc.returncode == 0, err[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks == _reference(tmp_path / "reference_cache", 2)
    # ... and together they are the one-process stream (Megatron sampler order).
    (single,) = _reference(tmp_path / "reference_cache", 1)
    assert [d for pair in zip(*ranks) for d in pair] == single
    _no_debris(cache)
