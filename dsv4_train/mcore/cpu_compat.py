"""Make Megatron-Core 0.19.2 run on a CPU-only machine over gloo.

Megatron-Core has no CPU path upstream: it imports triton unguarded, calls
`torch.cuda.current_device()` ~140 times, hard-codes `device="cuda"`, uses CUDA streams, a CUDA RNG
tracker and `Tensor.type()` string checks. Each patch below removes exactly one of those obstacles. The layer is applied only when CUDA is
absent; on a GPU machine nothing here runs. Every patch is named in `PATCHES` and has a test in
`tests/mcore/test_cpu_compat.py`. It patches private internals of megatron-core 0.19.2, so
`apply()` refuses any other version (dsv4_train/mcore/version.py::check_version).

Import order: call `apply()` before the first `import megatron.core` (the triton stub must be in
place before Megatron's import chain reaches `moe/ops/paged_stash.py`). `apply()` is idempotent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from typing import Callable, Dict

from dsv4_train.mcore import compute_context

import torch
from torch.overrides import TorchFunctionMode


_applied: Dict[str, bool] = {}
_mode: "CudaToCpuMode | None" = None


# ---------------------------------------------------------------------------------------------
# 1. triton stub: `megatron.core.transformer.moe.ops.paged_stash` imports triton at module level.
# ---------------------------------------------------------------------------------------------
def _stub_paged_stash_kernels() -> None:
    if importlib.util.find_spec("triton") is not None:
        return
    name = "megatron.core.transformer.moe.ops.paged_stash"
    stub = types.ModuleType(name)
    stub.__doc__ = "CPU stub of Megatron's triton paged-stash kernels (never called on CPU)."
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*_args, **_kwargs):  # pragma: no cover - only reached by misuse
        raise RuntimeError("MoE paged stash needs triton and CUDA; it is unavailable on CPU")

    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    sys.modules[name] = stub


# ---------------------------------------------------------------------------------------------
# 2. torch.cuda device/stream API: answer with the CPU / inert objects.
# ---------------------------------------------------------------------------------------------
class _InertStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is synchronous, so waiting is a no-op."""

    def __init__(self, *_args, **_kwargs):
        pass

    def wait_stream(self, *_a, **_k):
        return None

    def wait_event(self, *_a, **_k):
        return None

    def record_event(self, *_a, **_k):
        return _InertStream()

    def record(self, *_a, **_k):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, *_a, **_k):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _patch_cuda_api() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.Stream = _InertStream
    cuda.Event = _InertStream
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.synchronize = lambda *a, **k: None
    cuda.is_current_stream_capturing = lambda: False


# ---------------------------------------------------------------------------------------------
# 3. A TorchFunctionMode that maps device="cuda" to CPU and keeps `.cuda()` on CPU.
# ---------------------------------------------------------------------------------------------
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int)  # a bare int means a CUDA ordinal to torch


class CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA placement requests made by Megatron-Core into CPU placement.

    `Tensor.type()` without arguments answers the CUDA type name, because Megatron's optimizer and
    grad-clipping code assert `param.grad.type() == 'torch.cuda.FloatTensor'`.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Hot path (every torch call in the process goes through here): a call that is not one of
        # the special methods and names neither `device` nor `pin_memory` passes through untouched.
        if func in _SPECIAL_FUNCS:
            return _special_call(func, args, kwargs)
        if kwargs:
            if "device" in kwargs or "pin_memory" in kwargs:
                return func(*args, **_cpu_placement_kwargs(kwargs))
            return func(*args, **kwargs)
        return func(*args)


def _cpu_placement_kwargs(kwargs):
    """A copy of `kwargs` with a CUDA `device` mapped to CPU and `pin_memory` turned off."""
    kwargs = dict(kwargs)
    if "device" in kwargs and _is_cuda_device(kwargs["device"]):
        kwargs["device"] = "cpu"
    if kwargs.get("pin_memory"):
        kwargs["pin_memory"] = False
    return kwargs


def _special_call(func, args, kwargs):
    """The Tensor methods CudaToCpuMode answers itself or whose positional device it rewrites."""
    if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
        return args[0]
    if func is torch.Tensor.is_pinned:
        return False
    if func is torch.Tensor.type and len(args) == 1 and not kwargs:
        return _CUDA_TYPE_NAMES.get(args[0].dtype, func(*args))
    if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
        args = (args[0], "cpu") + tuple(args[2:])
    kwargs = _cpu_placement_kwargs(kwargs) if kwargs else {}
    return func(*args, **kwargs)


_SPECIAL_FUNCS = frozenset(
    (torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.type, torch.Tensor.is_pinned, torch.Tensor.to)
)


@contextlib.contextmanager
def mode_suspended():
    """Run a block without CudaToCpuMode's per-call hook (~1-2 us of Python per torch call).

    For model compute only: the V4 modules and the Megatron-Core layers they call place tensors
    with `torch.cuda.current_device()` (patched to "cpu" by `cuda_api`) or like their inputs, never
    with a literal "cuda", so the hook has nothing to rewrite there; the multi-process parity tests
    (tests/parallel) run every layout's forward through this. A no-op when the mode is not active
    (GPU machines) or when another mode sits above it.
    """
    if _mode is None or torch.overrides._get_current_function_mode() is not _mode:
        yield
        return
    with torch.overrides._pop_mode_temporarily():
        yield


def _enter_cuda_to_cpu_mode() -> None:
    global _mode
    _mode = CudaToCpuMode()
    _mode.__enter__()  # process-wide for the main thread; never exited while training
    compute_context.set_model_compute(mode_suspended)


# ---------------------------------------------------------------------------------------------
# 4. RNG tracker with CPU generator states (Megatron's keeps named CUDA generator states).
# ---------------------------------------------------------------------------------------------
def _install_cpu_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.CudaRNGStatesTracker
    if getattr(base, "_dsv4_cpu", False):
        return

    class CpuRNGStatesTracker(base):
        """Named RNG streams (data-parallel / model-parallel / expert) kept as CPU generator states."""

        _dsv4_cpu = True

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            generator = torch.Generator()
            generator.manual_seed(seed)
            self.states_[name] = generator.get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Checkpointing and activation recompute read/write "the CUDA RNG state": use the CPU one.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    mrandom.initialize_rng_tracker(force_reset=True)


# ---------------------------------------------------------------------------------------------
# 5. MoE all-to-all split sizes: converted to numpy only for CUDA tensors upstream.
# ---------------------------------------------------------------------------------------------
def _moe_split_sizes_to_numpy() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "_dsv4_cpu", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._dsv4_cpu = True
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    if hasattr(token_dispatcher, "maybe_move_tensor_to_cpu"):
        token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# ---------------------------------------------------------------------------------------------
# 6. Uneven first-dim all-gather / reduce-scatter: gloo has neither (expert TP > 1 with EP > 1).
# ---------------------------------------------------------------------------------------------
def _gloo_uneven_first_dim_collectives() -> None:
    """The alltoall MoE dispatcher gathers a different number of tokens from each expert-TP rank
    (`gather_from_sequence_parallel_region(..., output_split_sizes=...)`, reduce-scatter in
    backward). NCCL takes per-rank tensors of different sizes; gloo raises `invalid tensor size`
    (all_gather) or has no reduce_scatter. Same results by padding to the largest split and
    all-gathering, and by all-reducing and keeping this rank's rows."""
    from megatron.core.tensor_parallel import mappings

    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim
    if getattr(original_gather, "_dsv4_cpu", False):
        return

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        padded = input_.new_zeros((max(sizes),) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(gathered, padded.contiguous(), group=group)
        return torch.cat([chunk[:n] for chunk, n in zip(gathered, sizes)], dim=0)

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        torch.distributed.all_reduce(total, group=group)
        sizes = [int(n) for n in input_split_sizes]
        start = sum(sizes[: group.rank()])
        return total[start : start + sizes[group.rank()]].clone()

    _gather_along_first_dim._dsv4_cpu = True
    _reduce_scatter_along_first_dim._dsv4_cpu = True
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim


PATCHES: Dict[str, Callable[[], None]] = {
    "triton_stub": _stub_paged_stash_kernels,
    "cuda_api": _patch_cuda_api,
    "cuda_to_cpu_mode": _enter_cuda_to_cpu_mode,
    "cpu_rng_tracker": _install_cpu_rng_tracker,
    "moe_split_sizes_numpy": _moe_split_sizes_to_numpy,
    "gloo_uneven_first_dim_collectives": _gloo_uneven_first_dim_collectives,
}


def needed() -> bool:
    """The layer is for machines without CUDA only."""
    return not torch.cuda.is_available()


def apply(force: bool = False) -> None:
    """Apply every patch once: on machines without CUDA, or (force) for a run placed on the CPU by
    run.device=cpu on a machine that has CUDA."""
    if (not force and not needed()) or len(_applied) == len(PATCHES):
        return
    from dsv4_train.mcore.version import check_version

    check_version()  # the one version guard of the seam
    for name, patch in PATCHES.items():
        if not _applied.get(name):
            patch()
            _applied[name] = True


def applied() -> Dict[str, bool]:
    return dict(_applied)
