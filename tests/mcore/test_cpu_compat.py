"""Each patch of the CPU compatibility layer, checked on its own (CPU machines only)."""

import sys

import numpy as np
import pytest
import torch

from dsv4_train.mcore import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is applied only without CUDA")


@pytest.fixture(scope="module", autouse=True)
def applied(megatron_world1):
    cpu_compat.apply()
    return cpu_compat.applied()


def test_every_patch_applied_once(applied):
    assert set(applied) == set(cpu_compat.PATCHES) and all(applied.values())
    cpu_compat.apply()  # idempotent
    assert cpu_compat.applied() == applied


def test_megatron_imports_without_triton():
    import importlib.util

    import megatron.core.pipeline_parallel.schedules  # noqa: F401  (the chain that imports paged_stash)

    if importlib.util.find_spec("triton") is None:
        stub = sys.modules["megatron.core.transformer.moe.ops.paged_stash"]
        with pytest.raises(RuntimeError, match="triton"):
            stub.paged_stash_copy_kernel()


def test_cuda_device_and_streams_are_cpu_and_inert():
    assert torch.cuda.current_device() == "cpu"
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.cuda.is_current_stream_capturing() is False


def test_cuda_placement_requests_land_on_cpu():
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.empty(3, pin_memory=True).device.type == "cpu"
    # Megatron's optimizer asserts on these strings.
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # Explicit conversions keep working.
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_rng_tracker_streams_are_reproducible_and_isolated():
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(77)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(5)
    outer_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outer_before), "fork must restore the outer CPU RNG state"
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second), "the tracked stream advances between forks"
    tensor_parallel.model_parallel_cuda_manual_seed(77)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        again = torch.rand(4)
    assert torch.equal(first, again), "re-seeding reproduces the stream"


def test_moe_split_sizes_become_numpy():
    from megatron.core.transformer.moe import moe_utils

    out = moe_utils.maybe_move_tensor_to_cpu(torch.tensor([3, 5]), as_numpy=True)
    assert isinstance(out, np.ndarray) and out.tolist() == [3, 5]
    same = torch.tensor([1])
    assert moe_utils.maybe_move_tensor_to_cpu(same) is same


@pytest.mark.slow
def test_uneven_first_dim_collectives_over_gloo():
    """2 gloo ranks gather 3 + 1 rows and reduce-scatter them back (the expert-TP token gather)."""
    import subprocess
    from pathlib import Path

    from tests.helpers import cli_env

    worker = Path(__file__).with_name("uneven_collectives_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         str(worker)],
        cwd=Path(__file__).resolve().parents[2], env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


def test_refuses_other_megatron_versions(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_applied", {})
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.20.0")
    with pytest.raises(RuntimeError, match="megatron-core==0.19.2"):
        cpu_compat.apply()
