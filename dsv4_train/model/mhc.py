"""Manifold-constrained hyper-connections (mHC, paper §2.2): V4's replacement of the residual stream.

Megatron-Core 0.19.2 has no mHC, so this is hand-written. The residual is `hc_mult` streams,
laid out Megatron-style as [s, b, n_hc, d]. Each wrapped sub-layer owns one `HyperConnection`
(`hc_fn` [(2+n)n, n*d], `hc_base` [(2+n)n], `hc_scale` [3]); the model end owns a `HyperHead`.
All mHC arithmetic runs in fp32 (as in the official code) and results are cast back.

Formulas follow the official kernel order (paper §2.2): `pre = sigmoid(.) + eps`,
`post = 2 * sigmoid(.)` (no eps), `comb` = row softmax + eps, a column normalisation, then
(t_max - 1) x (row, column) normalisations, ending with a column normalisation.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from megatron.core.transformer.module import MegatronModule

from dsv4_train.model.primitives import at_least_fp32
from dsv4_train.model.sinkhorn import resolve_sinkhorn_kernel, sinkhorn_comb


def _weightless_rms_scale(flat: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(x^2) + eps) over the last dim, keepdim (applied after the mixing matmul)."""
    return torch.rsqrt(flat.square().mean(dim=-1, keepdim=True) + eps)


def _mark_sequence_parallel(module: torch.nn.Module, config) -> None:
    """Under sequence parallelism each TP rank sees only its slice of the tokens, so these
    replicated weights get partial gradients: the tag makes Megatron's `finalize_model_grads`
    sum them over TP (as it does for norm weights)."""
    for param in module.parameters(recurse=False):
        param.sequence_parallel = bool(config.sequence_parallel)


class HyperConnection(MegatronModule):
    """Coefficients and stream collapse/expand around one sub-layer (attention or MoE)."""

    def __init__(self, *, config, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float,
                 sinkhorn_kernel: str = "auto"):
        super().__init__(config=config)
        self.hc_mult = hc_mult
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_kernel = sinkhorn_kernel
        resolve_sinkhorn_kernel(sinkhorn_kernel, torch.device("cpu"))  # refuse an unknown name at build
        self.hc_eps = hc_eps
        self.norm_eps = norm_eps
        mix = (2 + hc_mult) * hc_mult
        width = hc_mult * config.hidden_size
        # Kept in fp32 regardless of params_dtype (official code; mHC is precision sensitive).
        self.fn = torch.nn.Parameter(torch.empty(mix, width, dtype=torch.float32))
        self.base = torch.nn.Parameter(torch.empty(mix, dtype=torch.float32))
        self.scale = torch.nn.Parameter(torch.empty(3, dtype=torch.float32))
        # Column -> its group (0 pre, 1 post, 2 res) in the mixing output; not saved in checkpoints.
        group = torch.tensor([0] * hc_mult + [1] * hc_mult + [2] * hc_mult * hc_mult)
        self.register_buffer("_scale_group", group, persistent=False)
        _mark_sequence_parallel(self, config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """From-scratch init (paper §2.2, our choice where the paper is silent): small alpha = 0.01
        ([MHC]); pre ~ 1/n, post = 1, comb ~ identity (diagonal +4 before Sinkhorn)."""
        n = self.hc_mult
        self.fn.normal_(0.0, self.config.init_method_std)
        self.scale.fill_(0.01)
        pre_bias = math.log(1.0 / (n - 1)) if n > 1 else 0.0
        self.base.zero_()
        self.base[:n] = pre_bias
        self.base[2 * n :].view(n, n).diagonal().fill_(4.0)

    def coefficients(self, streams: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [s, b, n, d] -> pre [s, b, n], post [s, b, n], comb [s, b, n, n] (all fp32)."""
        n = self.hc_mult
        flat = at_least_fp32(streams.flatten(-2))  # [s, b, n*d]
        mix = torch.nn.functional.linear(flat, at_least_fp32(self.fn)) * _weightless_rms_scale(flat, self.norm_eps)
        # The three groups' affine maps (pre, post, res) as one: scale[g] repeated over group g's
        # columns gives exactly the per-group products, in a third of the (overhead-bound) ops.
        logits = mix * self.scale.index_select(0, self._scale_group) + self.base  # [s, b, (2+n)n]
        # Contiguous copy: on a strided slice the sigmoid kernel takes another path that rounds
        # differently in the last ulp (measured HF parity worst case: 6.8e-6 with the copy,
        # 7.5e-6 without).
        gates = torch.sigmoid(logits[..., : 2 * n].contiguous())
        pre = gates[..., :n] + self.hc_eps
        post = gates[..., n:] * 2.0
        comb = sinkhorn_comb(
            logits[..., 2 * n :].unflatten(-1, (n, n)), iters=self.sinkhorn_iters, eps=self.hc_eps,
            compiled=resolve_sinkhorn_kernel(self.sinkhorn_kernel, logits.device),
            fallback=self.sinkhorn_kernel == "auto",
        )
        return pre, post, comb

    def pre(self, streams: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Collapse: returns (sub-layer input [s, b, d], post, comb)."""
        pre, post, comb = self.coefficients(streams)
        collapsed = (pre.unsqueeze(-1) * at_least_fp32(streams)).sum(dim=-2).to(streams.dtype)
        return collapsed, post, comb

    @staticmethod
    def post(output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Expand + mix: new[k] = post_k * f + sum_j comb[j, k] * X[j]; output [s, b, d] -> [s, b, n, d]."""
        return HyperConnection.expand(output, HyperConnection.mix(streams, comb), post)

    @staticmethod
    def mix(streams: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """sum_j comb[j, k] * X[j]: [s, b, n, d]."""
        return torch.matmul(comb.to(streams.dtype).transpose(-1, -2), streams)

    @staticmethod
    def expand(output: torch.Tensor, mixed: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        """post_k * f + mixed[k]: output [s, b, d] -> [s, b, n, d]."""
        return post.to(mixed.dtype).unsqueeze(-1) * output.unsqueeze(-2) + mixed


class HyperHead(MegatronModule):
    """Final stream contraction (paper §2.2): y = sum_i (sigmoid(scale*mix_i + base_i) + eps) X_i."""

    def __init__(self, *, config, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__(config=config)
        self.hc_mult = hc_mult
        self.hc_eps = hc_eps
        self.norm_eps = norm_eps
        self.fn = torch.nn.Parameter(torch.empty(hc_mult, hc_mult * config.hidden_size, dtype=torch.float32))
        self.base = torch.nn.Parameter(torch.empty(hc_mult, dtype=torch.float32))
        self.scale = torch.nn.Parameter(torch.empty(1, dtype=torch.float32))
        _mark_sequence_parallel(self, config)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = self.hc_mult
        self.fn.normal_(0.0, self.config.init_method_std)
        self.scale.fill_(0.01)
        self.base.fill_(math.log(1.0 / (n - 1)) if n > 1 else 0.0)  # weights ~ 1/n

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        """streams [s, b, n, d] -> [s, b, d]."""
        flat = at_least_fp32(streams.flatten(-2))
        mix = torch.nn.functional.linear(flat, at_least_fp32(self.fn)) * _weightless_rms_scale(flat, self.norm_eps)
        weights = torch.sigmoid(mix * self.scale + self.base) + self.hc_eps  # [s, b, n]
        return (weights.unsqueeze(-1) * at_least_fp32(streams)).sum(dim=-2).to(streams.dtype)
