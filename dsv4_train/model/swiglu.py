"""V4's clamped SwiGLU (paper §2.1, §4.2.3) with the routing weight folded in, as one autograd node: the gate
is clamped to <= limit, the linear half to [-limit, limit] (Megatron-Core's
`activation_func_clamp_value` / `glu_linear_offset`, `transformer/mlp.py`).

    out = silu(min(gate, L)) * (clamp(up, -L, L) + offset) * prob        gate, up = chunk(gate_up, 2)

The forward keeps only its inputs for the backward (no clamped/activated intermediates: one
[tokens, 2f] tensor instead of ~5) and recomputes the rest there. The prob multiplies the
activation before fc2, in fp32 and cast back, exactly as Megatron's `MLP.forward` does with its
`per_token_scale`; the clamp gradients follow `torch.clamp` (pass where min <= x <= max).
"""

from __future__ import annotations

from typing import Optional

import torch


def _clamped(gate_up: torch.Tensor, limit: Optional[float], offset: float):
    """(gate, up, clamped gate, clamped up + offset); the last two are fresh tensors."""
    gate, up = torch.chunk(gate_up, 2, dim=-1)
    gate_c = gate.clamp(max=limit) if limit is not None else gate.clone()
    up_c = up.clamp(min=-limit, max=limit) if limit is not None else up.clone()
    if offset:
        up_c.add_(offset)
    return gate, up, gate_c, up_c


class ClampedSwiGLU(torch.autograd.Function):
    """gate_up [N, 2f], prob [N] (fp32) -> [N, f] in gate_up's dtype.

    Written with in-place / out= ops: on CPU every fresh [N, f] temporary costs page faults (large
    allocations are new mappings), which dominated this function's time with plain expressions."""

    @staticmethod
    def forward(ctx, gate_up, prob, limit, offset):
        ctx.save_for_backward(gate_up, prob)
        ctx.limit, ctx.offset = limit, offset
        _, _, out, up_c = _clamped(gate_up, limit, offset)
        torch.nn.functional.silu(out, inplace=True)
        # (silu * up) rounded to gate_up's dtype, then x prob in fp32 and rounded again, like
        # Megatron's MLP (activation, then `* per_token_scale` and `.to(original_dtype)`).
        return out.mul_(up_c).mul_(prob.unsqueeze(-1))

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, prob = ctx.saved_tensors
        limit = ctx.limit
        if torch.compiler.is_compiling():  # a compiled block (model.compile): its own buffers, no out=
            return _backward_functional(ctx, grad_out, gate_up, prob)
        gate, up, gate_c, up_c = _clamped(gate_up, limit, ctx.offset)
        half = gate_c.shape[-1]
        grad_gate_up = torch.empty_like(gate_up)
        grad_gate, grad_up = grad_gate_up[..., :half], grad_gate_up[..., half:]
        scaled = grad_out * prob.unsqueeze(-1)  # d(out)/d(silu * up), fp32 when prob is
        act = torch.nn.functional.silu(gate_c)
        grad_prob = None
        if ctx.needs_input_grad[1]:
            wide = torch.promote_types(gate_up.dtype, torch.float32)  # fp32, fp64 stays fp64
            grad_prob = (act * up_c).mul_(grad_out).sum(-1, dtype=wide).to(prob.dtype)
        torch.mul(scaled, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(scaled.mul_(up_c), gate_c, grad_input=grad_gate)
        if limit is not None:  # torch.clamp's gradient: passes where min <= x <= max
            grad_gate.masked_fill_(gate > limit, 0)
            grad_up.masked_fill_((up < -limit).logical_or_(up > limit), 0)
        return grad_gate_up, grad_prob, None, None


def _backward_functional(ctx, grad_out, gate_up, prob):
    """`ClampedSwiGLU.backward` without in-place writes into slices (which torch.compile cannot
    trace); the same formulas, so the values agree with the eager backward up to fusion's rounding."""
    limit = ctx.limit
    gate, up, gate_c, up_c = _clamped(gate_up, limit, ctx.offset)
    scaled = grad_out * prob.unsqueeze(-1)
    act = torch.nn.functional.silu(gate_c)
    grad_prob = None
    if ctx.needs_input_grad[1]:
        wide = torch.promote_types(gate_up.dtype, torch.float32)
        grad_prob = (act * up_c * grad_out).sum(-1, dtype=wide).to(prob.dtype)
    grad_up = scaled * act
    grad_gate = torch.ops.aten.silu_backward(scaled * up_c, gate_c)
    if limit is not None:
        grad_gate = grad_gate.masked_fill(gate > limit, 0)
        grad_up = grad_up.masked_fill((up < -limit) | (up > limit), 0)
    return torch.cat([grad_gate, grad_up], dim=-1).to(gate_up.dtype), grad_prob, None, None


def clamped_swiglu(gate_up: torch.Tensor, prob: torch.Tensor, limit: Optional[float], offset: float = 0.0):
    return ClampedSwiGLU.apply(gate_up, prob, limit, offset)


def expert_activation(config):
    """gate_up, prob -> the experts' clamped SwiGLU x prob with `config`'s clamp and GLU offset."""
    limit, offset = config.activation_func_clamp_value, config.glu_linear_offset or 0.0
    return lambda gate_up, prob: clamped_swiglu(gate_up, prob, limit, offset)
