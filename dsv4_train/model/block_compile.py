"""Regional compilation of the V4 blocks (`model.compile`): each `V4Block` runs as torch.compile graphs.

At training shapes most of a block is small ops (mHC's coefficients and Sinkhorn projection, norms,
RoPE, the compressors, routing, SwiGLU), each paying its own launch (GPU) or dispatch (CPU);
compiled, they fuse into a few kernels per block, forward and backward. Per block, not the whole
model (as torchtitan does): the blocks of one kind share their compiled code, and the embedding,
output layer and loss plumbing stay eager.

Graph breaks are deliberate and few: Megatron's MoE aux-loss scaler (its backward scale is set at
run time, so it must not be baked in), outside bf16 the experts' grouped GEMM (torch 2.13's
fake-tensor rule for `torch._grouped_mm` takes bf16 only), and under EP / TP Megatron's token
dispatcher, which runs eagerly (its collectives and device-to-host syncs are not traceable; the
routing maths, experts and everything around them stay compiled). Values agree with eager up to the
rounding of fused kernels (tests/model/test_block_compile.py states the tolerance); with
`model.compile_backend=aot_eager` (the same capture, torch's kernels) they are bitwise equal.

Never a silent fallback: exceeding dynamo's recompile limit raises instead of running the block
eagerly, and a compiler error raises (the user asked for compilation).
"""

from __future__ import annotations

import os
import warnings

import torch

# Each distinct block kind (attention mode x hash routing x MTP) is one compiled entry, times the
# modes it runs in (train / eval, with and without grad under full recompute) and the shapes it
# sees. 64 leaves room for V4-Pro's kinds and evaluation at a second sequence length.
RECOMPILE_LIMIT = 64


def compile_block(block: torch.nn.Module, backend: str = "inductor") -> None:
    """Compile `block` in place (`nn.Module.compile`: parameter names and checkpoints unchanged);
    `backend`: model.compile_backend."""
    import torch._dynamo.config as dynamo_config

    if os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        warnings.warn("model.compile=true, but TORCHDYNAMO_DISABLE=1 is set in the environment: the blocks run "
                      "eagerly (unset it to compile them).", stacklevel=2)

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    dynamo_config.fail_on_recompile_limit_hit = True
    for module in block.modules():
        dispatcher = getattr(module, "token_dispatcher", None)
        if dispatcher is not None:
            _run_eagerly(dispatcher, DISPATCHER_STEPS)
        if hasattr(module, "attach_and_log_load_balancing_loss"):
            # Megatron's router logging: per-layer integers and a global tracker; compiled, it
            # would be one more graph per layer (Flash: 43) until dynamo's limit.
            _run_eagerly(module, ("attach_and_log_load_balancing_loss",))
    block.compile(backend=backend)


# Megatron-Core 0.19.2's `MoETokenDispatcher` steps, as `MoELayer` calls them.
DISPATCHER_STEPS = ("dispatch_preprocess", "token_dispatch", "dispatch_postprocess",
                    "combine_preprocess", "token_combine", "combine_postprocess")


def _run_eagerly(obj, method_names) -> None:
    for name in method_names:
        setattr(obj, name, torch.compiler.disable(getattr(obj, name)))
