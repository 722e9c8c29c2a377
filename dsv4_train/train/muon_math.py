"""Muon's per-matrix update as DeepSeek-V4 trains with it (hand-written: Megatron-Core's Muon imports
the `emerging-optimizers` package, which is not installable here).

    M_t = mu M_{t-1} + G_t;  O' = HybridNS(mu M_t + G_t);  O = O' sqrt(max(rows, cols)) 0.18
    W  <- W (1 - lr wd) - lr O

HybridNS normalises by the Frobenius norm, then runs 8 steps with (3.4445, -4.7750, 2.0315) and 2
with (2, -1.5, 0.5) (the last two pull every singular value to ~1, so the RMS rescale is exact to ~1%).
train/muon.py applies it per logical matrix inside the optimizer.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

HYBRID_SCHEDULE: Tuple[Tuple[float, float, float], ...] = (
    ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
)


def hybrid_newton_schulz(update: torch.Tensor, *, schedule: Sequence[Tuple[float, float, float]] = HYBRID_SCHEDULE,
                         dtype: torch.dtype = torch.float32, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonal polar factor of a 2-D matrix, or of each matrix of a [batch, rows, cols]
    stack (one batched matmul per iteration), computed in `dtype`, returned in fp32."""
    if update.dim() not in (2, 3):
        raise ValueError(f"Newton-Schulz needs a matrix or a stack of matrices, got shape {tuple(update.shape)}")
    x = update.to(dtype)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # iterate on the wide orientation: the Gram matrix x x^T is then the smaller one
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + eps)  # each matrix's Frobenius norm
    for a, b, c in schedule:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.float()


def scaled_orthogonal(direction: torch.Tensor, *, update_rms: float = 0.18,
                      ns_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HybridNS(direction) * sqrt(max(rows, cols)) * update_rms per matrix: an update of RMS ~update_rms."""
    return hybrid_newton_schulz(direction, dtype=ns_dtype) * (max(direction.shape[-2:]) ** 0.5 * update_rms)


def muon_matrix_step(param: torch.Tensor, grad: torch.Tensor, momentum: torch.Tensor, *, lr: float,
                     weight_decay: float, mu: float = 0.95, nesterov: bool = True,
                     update_rms: float = 0.18, ns_dtype: torch.dtype = torch.float32) -> None:
    """One in-place Muon step for ONE logically independent matrix (param, momentum updated)."""
    momentum.mul_(mu).add_(grad)
    direction = grad + mu * momentum if nesterov else momentum
    ortho = scaled_orthogonal(direction, update_rms=update_rms, ns_dtype=ns_dtype)
    param.mul_(1.0 - lr * weight_decay).sub_(lr * ortho.to(param.dtype))
