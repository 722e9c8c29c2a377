"""mHC's Sinkhorn projection (paper §2.2): [.., n, n] logits -> (nearly) doubly stochastic matrices.

Official order: row softmax + eps, a column normalisation, then (t_max - 1) x (row, column)
normalisations, each dividing by its sum + eps. Hand-written as one autograd node (`_SinkhornComb`)
because at n = 4 the plain loop's cost is per-op overhead; its two step loops run eagerly or as
torch.compile kernels (`model.sinkhorn_kernel`). Neither torch nor Megatron-Core has this projection.
"""

from __future__ import annotations

import functools
import warnings
from typing import List, Tuple

import torch

from dsv4_train.config.model import SINKHORN_KERNELS
from dsv4_train.mcore.compute_context import model_compute


def sinkhorn_comb(
    logits: torch.Tensor, *, iters: int, eps: float, compiled: bool = False, fallback: bool = False
) -> torch.Tensor:
    """Project [.., n, n] logits onto (nearly) doubly stochastic matrices, official order.

    Columns sum to 1 (up to eps) after the final step; rows to ~1. `compiled`: run the step loops
    as torch.compile kernels (`model.sinkhorn_kernel`, see `resolve_sinkhorn_kernel`); `fallback`:
    if compiling fails, warn once and run them eagerly (same values) instead of raising.
    """
    if torch.compiler.is_compiling():
        compiled = False  # inside a compiled block (model.compile): the enclosing graph fuses the loops
    return _SinkhornComb.apply(logits, iters, eps, (compiled, fallback))


def resolve_sinkhorn_kernel(choice: str, device: torch.device) -> bool:
    """model.sinkhorn_kernel -> whether the step loops run compiled ("auto": on CUDA, where the eager
    loops are ~270 kernel launches per mHC and micro-batch; eager on CPU, where compiling costs
    ~25 s at start-up)."""
    if choice not in SINKHORN_KERNELS:
        raise ValueError(f"model.sinkhorn_kernel={choice!r} is not one of {SINKHORN_KERNELS}.")
    return choice == "compiled" or (choice == "auto" and device.type == "cuda")


def _sinkhorn_dims(iters: int) -> Tuple[int, ...]:
    """The reduced dim of each step in the [rows, cols, matrices] layout of `_SinkhornComb`:
    a column step (sum over rows, dim 0), then (iters - 1) x (row step (dim 1), column step)."""
    return (0,) + (1, 0) * (iters - 1)


@functools.lru_cache(maxsize=16)
def _eps_tensor(eps: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """0-dim eps in the dtype the Python float would be applied in (fp32 opmath for fp32/bf16/fp16);
    cached, as building a tensor from a float costs as much as a small op. Read-only."""
    return torch.tensor(eps, dtype=torch.promote_types(dtype, torch.float32), device=device)


def _steps_forward(comb: torch.Tensor, eps: torch.Tensor, iters: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """comb [n_rows, n_cols, M] -> (each step's output, each step's denominator sum + eps)."""
    outputs, denominators = [], []
    # Positional torch.* calls: eagerly this loop is pure per-call overhead, and keyword parsing
    # alone is ~10% of it.
    for dim in _sinkhorn_dims(iters):
        denom = torch.sum(comb, dim, True).add_(eps)
        comb = torch.div(comb, denom)
        outputs.append(comb)
        denominators.append(denom)
    return outputs, denominators


def _steps_backward(grad: torch.Tensor, outputs: List[torch.Tensor], denominators: List[torch.Tensor],
                    iters: int) -> torch.Tensor:
    """Gradient [n_rows, n_cols, M] of the last step's output -> of the first step's input."""
    dims = _sinkhorn_dims(iters)
    for k in range(len(dims) - 1, -1, -1):
        # d/dx of x / (sum(x) + eps): (g - sum(g * out)) / denom (denom is constant along the
        # summed dim), 4 ops where autograd's g / d - sum(g * (out / d)) takes 5.
        grad = torch.sub(grad, torch.sum(torch.mul(grad, outputs[k]), dims[k], True)).div_(denominators[k])
    return grad


def _steps_forward_stacked(comb: torch.Tensor, eps: torch.Tensor, iters: int):
    """`_steps_forward` returning 3 stacked tensors (outputs [S, n, n, M], column-step denominators
    [C, 1, n, M], row-step ones [R, n, 1, M]): a compiled kernel's per-tensor cost is in its inputs
    and outputs (guards, wrapping), so the compiled path moves 3 tensors instead of 2 x 39."""
    outputs, denominators = _steps_forward(comb, eps, iters)
    return torch.stack(outputs), torch.stack(denominators[0::2]), torch.stack(denominators[1::2])


def _steps_backward_stacked(grad, outputs, column_denominators, row_denominators, iters: int):
    denominators = [None] * outputs.shape[0]
    denominators[0::2], denominators[1::2] = column_denominators.unbind(0), row_denominators.unbind(0)
    return _steps_backward(grad, outputs.unbind(0), denominators, iters)


@functools.lru_cache(maxsize=None)
def _compiled(loop):
    """`loop` as one torch.compile kernel (compiled at its first call per shape; dynamic in M after a
    second shape). On CPU its values equal the eager loop's bitwise (tests/model/test_sinkhorn_autograd.py)."""
    return torch.compile(loop, fullgraph=True)


_COMPILE_FAILED = set()  # loops whose compilation failed in this process (`auto` then runs them eagerly)


def _run_compiled(loop, fallback: bool, *args):
    """`loop(*args)` as its compiled kernel; on a compiler failure, re-raise, or with `fallback`
    (model.sinkhorn_kernel=auto) warn once and run `loop` eagerly from then on (the same function)."""
    if loop not in _COMPILE_FAILED:
        try:
            return _compiled(loop)(*args)
        except Exception as error:  # noqa: BLE001 (torch.compile raises many kinds; all mean "not compiled")
            if not fallback:
                raise
            _COMPILE_FAILED.add(loop)
            warnings.warn(
                f"model.sinkhorn_kernel=auto: compiling mHC's Sinkhorn loop {loop.__name__} failed "
                f"({type(error).__name__}: {str(error)[:300]}); running it eagerly (same values, more "
                f"kernel launches). Set model.sinkhorn_kernel=eager to skip the attempt.",
                stacklevel=2,
            )
    return loop(*args)


class _SinkhornComb(torch.autograd.Function):
    """Sinkhorn with the element-wise arithmetic of the plain autograd loop

        comb = softmax(logits, -1) + eps
        comb = comb / (comb.sum(-2, keepdim=True) + eps)        # then (iters - 1) x:
        comb = comb / (comb.sum(-1, keepdim=True) + eps);  comb = comb / (comb.sum(-2, keepdim=True) + eps)

    as ONE graph node: at mHC's tiny [.., n, n] matrices the loop's cost is per-op overhead (graph
    nodes forward, ~40 us of autograd engine work per step backward). Two further savings:
    the matrices are laid out [n_rows, n_cols, M] (M = all batch positions, innermost), so each
    normalisation broadcasts its sums over contiguous runs of M elements instead of runs of n; and
    eps is a 0-dim tensor (a Python float is re-wrapped into a tensor by every call). With
    `compiled`, the two step loops run as torch.compile kernels (`_steps_forward_stacked`,
    `_steps_backward_stacked`) instead of 3 (forward) and 4 (backward) ops per step; softmax stays
    torch's own kernel.

    Forward: bitwise the values of the loop (tests/model/test_sinkhorn_autograd.py checks with
    torch.equal, eager and compiled on CPU): every element sees the same IEEE operations in the
    same order (a sum over n entries accumulates them in index order in either layout). Backward:
    per step y = x / d, d = sum(x) + eps, the exact gradient g_x = (g - sum(g * y)) / d (autograd's
    DivBackward + SumBackward chain computes the same quantity as g / d - sum(g * (y / d)); the two
    differ only in rounding, measured <= 2.5e-7 of the largest entry in fp32 after 39 steps).
    Softmax uses torch's own backward kernel.
    """

    @staticmethod
    def forward(ctx, logits, iters, eps, kernel):
        compiled, fallback = kernel
        shape, n = logits.shape, logits.shape[-1]
        eps = _eps_tensor(eps, logits.dtype, logits.device)
        probs = torch.softmax(logits, dim=-1)
        comb = (probs + eps).reshape(-1, n, n).permute(1, 2, 0).contiguous()  # [n_rows, n_cols, M]
        compiled = compiled and iters > 1  # one step: nothing to fuse (and no row step to stack)
        if compiled:
            saved = _run_compiled(_steps_forward_stacked, fallback, comb, eps, iters)
            last = saved[0][-1]
        else:
            outputs, denominators = _steps_forward(comb, eps, iters)
            saved, last = (*outputs, *denominators), outputs[-1]
        ctx.save_for_backward(probs, *saved)
        ctx.iters, ctx.compiled, ctx.fallback = iters, compiled, fallback
        # Back to a contiguous [.., n, n]: the M-innermost layout would make the consumer's
        # batched matmul (comb^T @ streams) copy every 4x4 matrix (measured 3.3x slower there).
        return last.permute(2, 0, 1).contiguous().reshape(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        with model_compute():  # ~200 small ops: the CPU layer's hook would be 1/3 of it
            return _SinkhornComb._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        probs, *steps = ctx.saved_tensors
        n = probs.shape[-1]
        grad = grad.reshape(-1, n, n).permute(1, 2, 0).contiguous()  # [n_rows, n_cols, M]
        if ctx.compiled:
            grad = _run_compiled(_steps_backward_stacked, ctx.fallback, grad, *steps, ctx.iters)
        else:
            count = len(steps) // 2
            grad = _steps_backward(grad, steps[:count], steps[count:], ctx.iters)
        grad = grad.permute(2, 0, 1).reshape(probs.shape)
        return torch._softmax_backward_data(grad, probs, -1, probs.dtype), None, None, None
