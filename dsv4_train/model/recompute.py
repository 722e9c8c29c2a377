"""Selective activation recompute (`train.recompute=selective`, `train.recompute_modules`).

Each module drops tensors that are big to keep and cheap to redo in THIS code, with Megatron-Core's
`CheckpointWithoutOutput` (RNG-state aware; the dropped outputs' storage is freed after the forward
and refilled by a hook when the gradient reaches `hook_tensor`, before any backward reads them):

* `mhc`: each sub-layer's mHC collapse, stream mixing and pre-norm (mixing matmul, Sinkhorn, weighted
  stream sum, RMSNorm). Keeps only the input streams, which the mHC expansion keeps anyway; drops
  the normed sub-layer input [d] (kept by every projection reading it), `post`/`comb` and
  Sinkhorn's per-step [n, n] matrices ((2 * iters - 1) * (n^2 + n) values per token, 780 at
  n = 4, 20 iterations). Redo: one [n*d -> (2+n)n] matmul and element-wise work per token.
* `moe_act`: the routed experts' clamped SwiGLU x routing prob (grouped and batched experts, the
  per-expert loop of `sequential` too). Drops the [copies, f] activation fc2 keeps for its weight
  gradient; fc1's output stays (it is the activation's input). Redo: element-wise on [copies, 2f].
  Megatron-Core's own `moe_act` does the same for its TE grouped MLP.

Both modules are the default of `selective` (`train.recompute_modules: []`): together they drop
most of what a V4 block keeps beyond the projections' inputs, for well under 1% more FLOPs (no
GEMM is recomputed; the attention's blockwise core already recomputes its scores per block in its
backward, see model/sparse_attention.py). Measured savings: README ("Activation recompute").
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from dsv4_train.config.derive import RECOMPUTE_MODULES, selected_modules  # noqa: F401 (torch-free names)


def configure(transformer_config, recompute: str, modules: Sequence[str]) -> None:
    """Record the selected modules on the Megatron config before the model is built (modules copy
    it). Our own attribute: Megatron's `recompute_modules` would switch on recompute in its modules."""
    transformer_config.dsv4_recompute_modules = selected_modules(recompute, modules)


def active(config, name: str) -> bool:
    """True when `name` is recomputed in this forward (training with autograd on)."""
    return name in getattr(config, "dsv4_recompute_modules", ()) and torch.is_grad_enabled()


def run_dropping_outputs(enabled: bool, function: Callable, *args):
    """`function(*args)`; when `enabled`, under `CheckpointWithoutOutput` (returned second, None
    otherwise): the caller must pass it to `release` once the outputs' consumers have run."""
    if not enabled:
        return function(*args), None
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    checkpoint = CheckpointWithoutOutput(fp8=None)  # None: no FP8 context (any other value means FP8)
    return checkpoint.checkpoint(function, *args), checkpoint


def release(checkpoint, hook_tensor: torch.Tensor) -> None:
    """Free the checkpointed outputs; recompute them when `hook_tensor`'s gradient arrives."""
    if checkpoint is not None:
        checkpoint.discard_output_and_register_recompute(hook_tensor)
