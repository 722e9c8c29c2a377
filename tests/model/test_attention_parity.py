"""HybridAttention vs transformers' DeepseekV4Attention (test-only oracle), CPU fp32, tiny config.

Layers of conf/model/tiny.yaml: 0 = sliding window, 1 = CSA (ratio 4, indexer top-4 of up to 16
entries, 8 indexer heads), 2 = HCA (ratio 16). Random HF weights are copied into our module through
the official-name mapping; both run on the same input (b=2, s=64).
"""

import pytest
import torch

import hf_attention_oracle as oracle
from conftest import tiny_model_config

BATCH, SEQ = 2, 64
# fp32, identical algorithm: 1e-5 absolute on O(1) outputs is ~100 ulp of headroom for a different
# summation order (measured: 0.0).
OUTPUT_ATOL = 1e-5
# Gradients are sums over B*S positions (magnitudes ~10-30); relative to the largest entry, fp32
# reordering stays below ~1e-6 (measured <= 7e-7); 1e-5 leaves margin and still catches any real error.
GRAD_RTOL = 1e-5


def _pair(build_attention, layer_index, seed, **overrides):
    cfg = tiny_model_config(**overrides)
    hf_cfg, hf_attn = oracle.random_hf_attention(cfg, layer_index, seed=seed)
    ours = build_attention(cfg, layer_index)
    oracle.copy_hf_into_ours(hf_attn, ours)
    return cfg, hf_cfg, hf_attn, ours


def _input(seed):
    return torch.randn(BATCH, SEQ, 64, generator=torch.Generator().manual_seed(seed))


# The dense reference and the blockwise path (blocks of 16 queries: several block boundaries).
BACKENDS = {"dense": {"attention_backend": "dense"}, "blockwise": {"attention_backend": "blockwise", "attention_block_size": 16}}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("layer_index,mode", [(0, "sliding_window"), (1, "csa"), (2, "hca")])
def test_forward_and_gradients_match_hf(build_attention, layer_index, mode, backend):
    cfg, hf_cfg, hf_attn, ours = _pair(build_attention, layer_index, seed=10 + layer_index, **BACKENDS[backend])
    assert ours.mode == mode
    x = _input(100 + layer_index)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_hf = oracle.run_hf(hf_cfg, hf_attn, x_hf)
    y_ours = oracle.run_ours(ours, x_ours)
    assert y_hf.abs().max() > 0.5  # outputs are O(1), so the absolute tolerance is meaningful
    assert (y_hf - y_ours).abs().max().item() <= OUTPUT_ATOL

    upstream = torch.randn(y_hf.shape, generator=torch.Generator().manual_seed(5))
    (y_hf * upstream).sum().backward()
    (y_ours * upstream).sum().backward()
    hf_grads, our_grads = oracle.grads_by_hf_name(hf_attn, ours)
    expected = {"sinks", "q_a_proj.weight", "kv_proj.weight", "o_a_proj.weight", "o_b_proj.weight"}
    if layer_index > 0:
        expected |= {"compressor.position_bias", "compressor.kv_proj.weight", "compressor.gate_proj.weight"}
    assert expected <= set(hf_grads)
    for name, g_hf in hf_grads.items():
        err = (g_hf - our_grads[name]).abs().max().item()
        assert err <= GRAD_RTOL * g_hf.abs().max().item(), (name, err)
    assert (x_hf.grad - x_ours.grad).abs().max().item() <= GRAD_RTOL * x_hf.grad.abs().max().item()


def test_csa_topk_selection_matters_and_has_no_boundary_ties(build_attention):
    """The CSA parity above is only meaningful if top-k really drops entries and is tie-free."""
    cfg, hf_cfg, hf_attn, ours = _pair(build_attention, 1, seed=11)
    x = _input(101)
    xs = x.transpose(0, 1)
    with torch.no_grad():
        c_q = ours.q_norm(ours.wq_a(xs))
        visible = torch.arange(SEQ // 4)[None, :] < ((torch.arange(SEQ) + 1) // 4)[:, None]
        scores = ours.indexer.scores(xs, c_q, torch.arange(SEQ), visible)  # [B, T, N]
    k = cfg.index_topk
    rows_with_choice = visible.sum(-1) > k
    assert rows_with_choice.sum() > 40  # most queries see more than k entries
    top = scores.sort(dim=-1, descending=True).values
    gap = (top[..., k - 1] - top[..., k])[:, rows_with_choice]
    # Spec §13.11: a tie at the k-th place would make two correct implementations disagree.
    assert gap.min().item() > 1e-4

    # Dense attention over all visible entries gives a clearly different output than HF's top-k.
    dense = build_attention(tiny_model_config(indexer_phase="warmup"), 1)
    oracle.copy_hf_into_ours(hf_attn, dense)
    with torch.no_grad():
        y_hf = oracle.run_hf(hf_cfg, hf_attn, x)
        assert (oracle.run_ours(dense, x) - y_hf).abs().max() > 1e-2
        assert (oracle.run_ours(ours, x) - y_hf).abs().max() <= OUTPUT_ATOL
