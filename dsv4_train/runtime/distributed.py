"""Start and stop the distributed runtime: device, process group, Megatron parallel state, seeds.

CUDA + NCCL when a GPU is present (nothing patched); CPU + gloo otherwise, with the CPU
compatibility layer applied before Megatron-Core is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from dsv4_train.launch.env import ProcessEnv, discover
from dsv4_train import mcore
from dsv4_train.runtime.process import die_with_parent


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    backend: str
    process: ProcessEnv

    @property
    def rank(self) -> int:
        return self.process.rank

    @property
    def world_size(self) -> int:
        return self.process.world_size

    @property
    def is_main(self) -> bool:
        return self.process.rank == 0


def pick_device(requested: str = "auto") -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"run.device={requested!r} is not one of auto, cpu, cuda.")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda but no CUDA device is available; use run.device=auto or cpu.")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def die_with_launcher() -> None:
    """Under torchrun: the worker dies when its launcher (the elastic agent, our parent) dies, so a
    kill -9 of the agent leaves no worker training unsupervised."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent()


def init_process_group(*, device_request: str = "auto", timeout_s: int = 600) -> Runtime:
    """Initialise torch.distributed (idempotent) and return where this process runs."""
    die_with_launcher()
    device = pick_device(device_request)
    mcore.apply(cpu=device.type == "cpu")  # the CPU layer also on a CUDA host when run.device=cpu
    process = discover()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(process.local_rank)
        device = torch.device("cuda", process.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{process.master_addr}:{process.master_port}",
            rank=process.rank,
            world_size=process.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return Runtime(device=device, backend=backend, process=process)


def init_model_parallel(
    *, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, ep: int = 1, etp: Optional[int] = None, cp: int = 1
) -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def seed_everything(seed: int) -> None:
    """Seed torch plus Megatron's named (data/model/expert parallel) RNG streams."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_single_process_for_tools(seed: int = 0) -> Runtime:
    """World-size-1 runtime for tools and tests (HF import, plans that build modules)."""
    for var in ("RANK", "WORLD_SIZE"):
        if var in os.environ and os.environ[var] != "0" and var == "RANK":
            raise RuntimeError("init_single_process_for_tools called inside a multi-process launch")
    runtime = init_process_group()
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel()
    seed_everything(seed)
    return runtime


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
