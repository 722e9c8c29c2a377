"""Suite-wide settings: one thread, no torch.compile (identical numerics, much faster start-up)."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def megatron_world1():
    """A world-size-1 gloo group with Megatron's parallel state (TP=PP=EP=CP=1), CPU layer applied."""
    from dsv4_train.runtime.distributed import init_single_process_for_tools

    return init_single_process_for_tools(seed=1234)
