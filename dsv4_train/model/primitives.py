"""Small building blocks V4 needs and Megatron-Core's local (non-TE) path lacks.

* `RMSNorm`: DeepSeek's RMSNorm (fp32 statistics and fp32 weight, result cast back to the input
  dtype). Megatron's `WrappedTorchNorm` computes in the input dtype and cannot be weightless.
* `rms_normalize`: the weightless per-head RMSNorm of V4 queries.
* `ReplicatedLinear`: a bias-free linear whose weight is identical on every tensor-parallel rank
  (Megatron-Core only offers a "duplicated" linear through Transformer Engine). Its weight is
  initialised with the default RNG, which `model_parallel_cuda_manual_seed` seeds identically on all
  TP ranks, so replicas start equal. Callers that feed its output into head-split computation must
  pass the output through `copy_to_tensor_model_parallel_region` so the replicas receive the full
  gradient (see `attention.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or unchanged when wider (fp64): the fp32 maths of the model stays fp32 for bf16 /
    fp32 runs, and a float64 model computes in float64 throughout (tests/model/test_documents.py
    proves document isolation exact that way)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, statistics in fp32 (or wider), result in x.dtype."""
    x32 = at_least_fp32(x)
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable fp32 weight; computes in fp32 and returns the input dtype."""

    def __init__(self, dim: int, *, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = at_least_fp32(x)
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (at_least_fp32(self.weight) * normed).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class ReplicatedLinear(nn.Module):
    """y = x W^T with W [out, in] replicated on every TP rank; optionally computed in fp32."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        init_method,
        params_dtype: torch.dtype,
        compute_in_fp32: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_in_fp32 = compute_in_fp32
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=params_dtype))
        with torch.no_grad():
            init_method(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute_in_fp32:
            return F.linear(at_least_fp32(x), at_least_fp32(self.weight))
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp32={self.compute_in_fp32}"
