"""Nothing a checkpoint holds runs code when it is loaded (checkpoint/safe_load.py).

A harmless payload (its unpickling would create a marker file) is planted in each kind of pickle a
checkpoint has: the distributed checkpoint's `.metadata`, our per-rank RNG file, and a non-tensor item
of a `.distcp` file (through the CLI, and through torch's load planner directly). Without manifest
verification, resuming refuses with one message naming the file (exit 2, no traceback); with it (the
default) the changed file fails its checksum and the run falls back to an intact checkpoint. Either
way the marker never appears; an untouched checkpoint still resumes.
"""

from __future__ import annotations

import io
import pickle
import shutil

import pytest
import torch

from dsv4_train.checkpoint.safe_load import tensors_only_loads
from tests.helpers import run_cli

RUN = ["optim.warmup_steps=1", "checkpoint.save_interval=1", "checkpoint.keep_last=5"]


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("safe") / "run"
    result = run_cli(["train.max_steps=2", *RUN, f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _resume(run_dir, tmp_path, plant, *extra):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    marker = tmp_path / "payload_ran"
    target = plant(copy / "checkpoints" / "step_00000002", marker)
    result = run_cli(["train.max_steps=3", *RUN, *extra, f"run.dir={copy}"], timeout=600)
    return result, marker, target


def _plant_metadata(step_dir, marker):
    (step_dir / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return step_dir / ".metadata"


def _plant_rng(step_dir, marker):
    torch.save({"python": Payload(marker)}, step_dir / "rng" / "rank_0.pt")
    return step_dir / "rng" / "rank_0.pt"


def _plant_distcp(step_dir, marker):
    """The payload replaces the checkpoint's common-state item inside `__0_0.distcp`; `.metadata`
    is rewritten (same allow-listed classes) to the item's new offsets so the loader reaches it."""
    import dataclasses

    meta = pickle.loads((step_dir / ".metadata").read_bytes())  # our own, intact file
    key = next(k for k in meta.storage_data if k.fqn.startswith("common_state"))
    info = meta.storage_data[key]
    buffer = io.BytesIO()
    torch.save({"optimizer": Payload(marker)}, buffer)
    blob = buffer.getvalue()
    path = step_dir / info.relative_path
    data = path.read_bytes()
    path.write_bytes(data[:info.offset] + blob + data[info.offset + info.length:])
    for k, v in list(meta.storage_data.items()):
        if v.relative_path == info.relative_path and v.offset > info.offset:
            meta.storage_data[k] = dataclasses.replace(v, offset=v.offset + len(blob) - info.length)
    meta.storage_data[key] = dataclasses.replace(info, length=len(blob))
    (step_dir / ".metadata").write_bytes(pickle.dumps(meta))
    return step_dir  # the message names the checkpoint (the item's file is one of its .distcp files)


@pytest.mark.slow
@pytest.mark.parametrize("plant", [_plant_metadata, _plant_rng, _plant_distcp], ids=["metadata", "rng", "distcp"])
def test_planted_payload_is_refused_and_never_runs(trained, tmp_path, plant):
    # checkpoint.verify=off: the loaders themselves are the guard (with verification on, the changed
    # file fails its checksum first and the run falls back: the next test).
    result, marker, target = _resume(trained, tmp_path, plant, "checkpoint.verify=off")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert not marker.exists(), "the payload ran"
    assert str(target) in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_planted_payload_fails_verification_and_the_run_falls_back(trained, tmp_path):
    result, marker, target = _resume(trained, tmp_path, _plant_metadata)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists(), "the payload ran"
    assert f"{target}: " in result.stdout and "falling back to the newest verified checkpoint" in result.stdout


@pytest.mark.slow
def test_untouched_checkpoint_resumes(trained, tmp_path):
    result, marker, _ = _resume(trained, tmp_path, lambda step_dir, marker: None)
    assert result.returncode == 0, result.stderr[-3000:]


def test_non_tensor_items_of_distcp_files_load_tensors_only(tmp_path):
    """torch's load planner reads a .distcp non-tensor item with torch.load(weights_only=False);
    inside tensors_only_loads() the same call cannot unpickle the payload."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    marker = tmp_path / "payload_ran"
    buffer = io.BytesIO()
    torch.save({"scheduler": Payload(marker)}, buffer)
    planner = DefaultLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}

    class Item:  # the one attribute load_bytes reads
        class dest_index:
            fqn = "scheduler"

    with tensors_only_loads(), pytest.raises(pickle.UnpicklingError):
        buffer.seek(0)
        planner.load_bytes(Item, buffer)
    assert not marker.exists()
    buffer.seek(0)
    planner.load_bytes(Item, io.BytesIO(_plain_bytes()))  # plain values still load
    assert planner.state_dict["scheduler"] == {"step": 3, "lr": 0.1}


def _plain_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save({"step": 3, "lr": 0.1}, buffer)
    return buffer.getvalue()


def test_rng_files_of_earlier_versions_still_load(megatron_world1, tmp_path):
    """Before RNG states were stored as tensors, the RNG file held numpy's state array: it loads
    (numpy array reconstruction is allow-listed, data only) and restores the generators exactly."""
    import random

    import numpy as np

    from dsv4_train.checkpoint.io import _set_rng_state
    from dsv4_train.checkpoint.safe_load import load_tensors_file

    random.seed(3)
    np.random.seed(3)
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "cuda": None, "tracker": {}}
    expected = (random.random(), float(np.random.rand()))
    torch.save(legacy, tmp_path / "rank_0.pt")
    random.seed(99)
    np.random.seed(99)
    from megatron.core import tensor_parallel

    state = load_tensors_file(str(tmp_path / "rank_0.pt"))
    state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    _set_rng_state(state)
    assert (random.random(), float(np.random.rand())) == expected
