"""Spec §14 properties of HybridAttention on the tiny config (fp32, CPU, b=2, s=64).

Layer 0 = sliding window (8 tokens), layer 1 = CSA (ratio 4, top-4), layer 2 = HCA (ratio 16).
"""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from conftest import tiny_model_config
from dsv4_train.model import attention as attention_mod
from dsv4_train.model import aux_losses

SEQ, BATCH, HIDDEN = 64, 2, 64
# Rows that must be unaffected see exactly the same arithmetic (masked keys have probability exactly
# 0), so they agree to the last bit in practice; 1e-6 only guards against BLAS blocking differences.
UNCHANGED_ATOL = 1e-6
# A perturbation of size 1 on a token moves affected outputs by >~1e-3; 1e-5 separates the two.
CHANGED_MIN = 1e-5



def _cfg(**overrides):
    # Larger init than the default 0.02 so outputs are O(0.1-1) and absolute thresholds mean something.
    # Blocks of 16 queries: the default (blockwise) backend crosses several block boundaries.
    overrides = {"attention_block_size": 16, **overrides}
    return tiny_model_config(init_std=0.2, **overrides)


MODES = [(0, "sparse"), (1, "sparse"), (1, "warmup"), (1, "dense"), (2, "sparse")]


def _x(seed=0):
    return torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _row_change(module, x, token, **kwargs):
    """Max |Δoutput| per query position [T] when token `token` of batch 0 is perturbed."""
    with torch.no_grad():
        base = module(x, **kwargs)
        bumped = x.clone()
        bumped[token, 0] += torch.randn(HIDDEN, generator=torch.Generator().manual_seed(99))
        moved = module(bumped, **kwargs)
    assert (moved[:, 1] - base[:, 1]).abs().max() == 0  # batch rows are independent
    return (moved[:, 0] - base[:, 0]).abs().amax(-1)


@pytest.mark.parametrize("layer_index,phase", MODES)
def test_causality_under_perturbation(build_attention, layer_index, phase):
    cfg = _cfg(indexer_phase=phase)
    module = build_attention(cfg, layer_index)
    x = _x()
    for token in (0, 21, 40, 63):
        change = _row_change(module, x, token)
        if token:
            assert change[:token].max().item() <= UNCHANGED_ATOL  # no query before the token moves
        # ...while every query whose window holds the token does (so the check above can fail).
        assert change[token : token + cfg.sliding_window].min().item() > CHANGED_MIN


def test_window_includes_the_query_token(build_attention):
    cfg = _cfg()
    module = build_attention(cfg, 0)
    token, window = 20, cfg.sliding_window
    change = _row_change(module, _x(1), token)
    moved = (change > CHANGED_MIN).nonzero().flatten().tolist()
    # Exactly queries token .. token+window-1 see it: `window` positions including the query itself.
    assert moved == list(range(token, token + window))
    assert change[token + window :].max().item() <= UNCHANGED_ATOL


def test_hca_compressed_entry_visible_only_once_its_block_is_complete(build_attention):
    cfg = _cfg()
    module = build_attention(cfg, 2)  # ratio 16, window 8
    token = 16  # first token of block 1 -> entry 1, complete at t = 31
    change = _row_change(module, _x(2), token)
    outside_window = torch.arange(token + cfg.sliding_window, SEQ)
    seen = change[outside_window] > CHANGED_MIN
    # Entry s is visible to query t iff s < floor((t + 1) / m): here iff t >= 31.
    assert seen.tolist() == (outside_window >= 31).tolist()


@pytest.mark.parametrize("phase", ["dense", "warmup"])
def test_csa_overlapping_entry_visibility(build_attention, phase):
    # Window 1 (only the query itself) isolates the compressed branch.
    module = build_attention(_cfg(sliding_window=1, indexer_phase=phase), 1)
    token = 9  # in block 2: feeds entry 2 (own half, complete at t=11) and entry 3 (previous half)
    change = _row_change(module, _x(3), token)
    moved = set((change > CHANGED_MIN).nonzero().flatten().tolist())
    assert moved == {9} | set(range(11, SEQ))


def test_visibility_rule_matches_spec_definition():
    for ratio in (4, 16):
        vis = attention_mod.compressed_visibility(SEQ, ratio, torch.device("cpu"))
        for t in range(SEQ):
            for s in range(SEQ // ratio):
                # Entry s covers tokens [m*s, m*s+m-1]; it is visible once its last token is <= t.
                assert bool(vis[t, s]) == (ratio * s + ratio - 1 <= t)


def test_joint_softmax_rows_sum_below_one_by_the_sink_share():
    gen = torch.Generator().manual_seed(4)
    q, keys = torch.randn(2, 3, 10, 16, generator=gen), torch.randn(2, 14, 16, generator=gen)
    allowed = torch.rand(10, 14, generator=gen) > 0.5
    allowed[:, 0] = True
    sink = torch.randn(3, generator=gen)
    out, probs = attention_mod.joint_softmax_attention(q, keys, allowed, sink, 0.25)
    logits = (q @ keys.transpose(1, 2)[:, None]) * 0.25
    denom = torch.where(allowed, logits.exp(), 0).sum(-1) + sink.exp()[None, :, None]
    # Independent formula: the sink takes exp(sink) / (sum exp(z) + exp(sink)); fp32 rounding only.
    torch.testing.assert_close(probs.sum(-1), 1 - sink.exp()[None, :, None] / denom, rtol=0, atol=1e-6)
    assert (probs.sum(-1) < 1).all() and (probs[..., ~allowed] == 0).all()
    torch.testing.assert_close(out, probs @ keys[:, None], rtol=0, atol=1e-6)


@pytest.mark.parametrize("layer_index", [0, 1, 2])
def test_module_attention_rows_sum_below_one(build_attention, monkeypatch, layer_index):
    module = build_attention(_cfg(attention_backend="dense"), layer_index)  # inspects the dense probs
    seen = []
    original = attention_mod.joint_softmax_attention

    def recording(*args, **kwargs):
        out, probs = original(*args, **kwargs)
        seen.append(probs.detach())
        return out, probs

    monkeypatch.setattr(attention_mod, "joint_softmax_attention", recording)
    with torch.no_grad():
        module(_x(5))
    sums = seen[0].sum(-1)
    assert (sums < 1).all() and (sums > 0).all()


@pytest.mark.parametrize("layer_index", [0, 1, 2])
def test_rope_offset_invariance(build_attention, layer_index):
    """Shifting every position by a multiple of the largest ratio (16) leaves outputs unchanged."""
    module = build_attention(_cfg(), layer_index)
    x = _x(6)
    with torch.no_grad():
        base = module(x)
        for shift in (16, 160):
            shifted = module(x, position_ids=torch.arange(SEQ) + shift)
            # RoPE angles are pos * freq in fp32: at positions ~200 the angle error is ~1e-5 rad;
            # measured relative differences are ~1e-6. 1e-4 (relative to the largest output) is far
            # below the O(1) relative change a wrong relative position (e.g. no de-rotation) causes.
            assert (shifted - base).abs().max().item() <= 1e-4 * base.abs().max().item(), shift


def test_position_ids_actually_used(build_attention):
    module = build_attention(_cfg(), 2)
    x = _x(7)
    with torch.no_grad():
        scrambled = module(x, position_ids=torch.arange(SEQ).flip(0))
        assert (scrambled - module(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="position_ids"):
        module(x, position_ids=torch.arange(SEQ + 1))


@pytest.mark.parametrize("phase", ["warmup", "sparse"])
def test_indexer_gradients_are_isolated(build_attention, phase):
    """Indexer params learn only from the indexer loss; backbone params get nothing from it."""
    cfg = _cfg(indexer_phase=phase)
    module = build_attention(cfg, 1)
    x = _x(8)
    upstream = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(9))

    def grads(aux_scale):
        module.zero_grad(set_to_none=True)
        aux_losses.drain()
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(aux_scale))
        try:
            (module(x) * upstream).sum().backward()
        finally:
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        assert aux_losses.pending() == {"indexer_loss": 1}
        return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}

    lm_only, with_aux = grads(0.0), grads(1.0)
    indexer = [n for n in lm_only if n.startswith("indexer.")]
    backbone = [n for n in lm_only if not n.startswith("indexer.")]
    assert len(indexer) == 6 and len(backbone) == 12
    for name in indexer:  # LM loss alone: nothing reaches the indexer
        assert lm_only[name] is None or lm_only[name].abs().max() == 0, name
        assert with_aux[name] is not None and with_aux[name].abs().max() > 0, name
    for name in backbone:  # the indexer loss adds exactly nothing to the backbone
        assert torch.equal(lm_only[name], with_aux[name]), name
    aux_losses.drain()


def test_dense_phase_runs_no_indexer(build_attention):
    module = build_attention(_cfg(indexer_phase="dense"), 1)
    aux_losses.drain()
    (module(_x(10)) ** 2).sum().backward()
    assert aux_losses.pending() == {}
    assert all(p.grad is None for n, p in module.named_parameters() if n.startswith("indexer."))


def test_eval_mode_records_no_indexer_loss(build_attention):
    module = build_attention(_cfg(), 1).eval()
    aux_losses.drain()
    module(_x(11))
    assert aux_losses.pending() == {}


def test_bad_configs_raise_value_errors(build_attention):
    with pytest.raises(ValueError, match="indexer_phase"):
        build_attention(_cfg(indexer_phase="topk"), 1)
    with pytest.raises(ValueError, match="layer_index"):
        build_attention(_cfg(), 6)
    with pytest.raises(ValueError, match="o_groups"):
        build_attention(_cfg(o_groups=3), 0)


def test_mtp_layer_uses_plain_rope_and_window_only(build_attention):
    cfg = _cfg()
    module = build_attention(cfg, cfg.num_layers)  # the MTP block's entry of compress_ratios
    assert module.mode == "sliding_window" and module.compressor is None and module.indexer is None
    assert module.rotary.base == cfg.rope_theta and module.rotary.yarn is None


def test_sharded_state_dict_marks_sink_as_tensor_parallel(build_attention):
    module = build_attention(_cfg(), 1)
    state = module.sharded_state_dict(prefix="attn.")
    sink = state["attn.attn_sink"]
    assert sink.axis_fragmentations[0] == 1 and sink.global_shape == (4,)
    assert "attn.indexer.weights_proj.weight" in state and "attn.compressor.ape" in state
