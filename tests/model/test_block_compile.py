"""`model.compile` (model/block_compile.py): compiled V4 blocks train like eager ones.

A 2-layer V4 (CSA with the indexer's top-k and hash routing, HCA with scored routing, one MTP block
with sliding-window attention), fp32, train mode with labels: one forward + backward compiled
(inductor's CPU backend) and eagerly from the same weights and tokens.

Tolerances: compiled kernels fuse and reorder fp32 reductions (mHC's RMS over n*d, the softmaxes,
the Sinkhorn sums), so the last bits differ. The loss: 1e-6 relative. The whole gradient (all
parameters as one vector): 1e-5 relative to its norm. Each parameter: 1e-2 relative to its largest
entry, loose on purpose: the mHC head `scale`/`base`/`fn` gradients are sums over every token of
products that nearly cancel, so ~1e-7 differences upstream become ~1e-3 of their (small) largest
entry; a wrong graph gives O(1). Measured here: loss bitwise equal, whole gradient 2.4e-7, worst
parameter 1.2e-3 (mtp.0.hc_head.scale). Routing is discrete and must not move: the routers' token
counts (the expert-bias update's input) are equal. ~40 s with a cold inductor cache, most of it
compiling the three block kinds.
"""

from __future__ import annotations

import pytest
import torch
from v4_model_helpers import tiny_cfg, tokens

LOSS_TOLERANCE = 1e-6
GRAD_TOLERANCE = 1e-5  # the whole gradient: |g_compiled - g_eager| / |g_eager|; see the module docstring
PER_PARAMETER_TOLERANCE = 1e-2  # each parameter, relative to its largest entry (a wrong graph gives O(1))


@pytest.fixture
def dynamo_enabled(monkeypatch):
    """The suite turns torch.compile off (tests/conftest.py); lift that for this test only (torch
    reads TORCHDYNAMO_DISABLE when a module is compiled) and drop the compiled code after."""
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train_step(compile_blocks: bool, state=None):
    from dsv4_train.model import aux_losses
    from dsv4_train.model.block import V4Block
    from dsv4_train.model.builder import build_model
    from dsv4_train.model.transformer_config import build_transformer_config

    cfg = tiny_cfg(num_layers=2, compress_ratios=[4, 16, 0], num_hash_layers=1, compile=compile_blocks)
    torch.manual_seed(0)
    model = build_model(model_cfg=cfg, transformer_config=build_transformer_config(model_cfg=cfg)).train()
    if state is not None:
        model.load_state_dict(state)
    blocks = [m for m in model.modules() if isinstance(m, V4Block)]
    assert len(blocks) == 3 and all((m._compiled_call_impl is not None) == compile_blocks for m in blocks)
    ids = tokens(cfg, batch=2, seq=64)
    loss = model(ids, labels=torch.roll(ids, -1, dims=1))[:, :-1].mean()
    loss.backward()
    aux_losses.drain()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    counts = {name: b.clone() for name, b in model.named_buffers() if name.endswith("local_tokens_per_expert")}
    return model.state_dict(), loss.detach(), grads, counts


def test_compiled_blocks_train_like_eager(megatron_world1, dynamo_enabled):
    from torch._dynamo.utils import counters

    state, loss, grads, counts = _train_step(False)
    graphs_before = counters["stats"]["unique_graphs"]
    _, loss_c, grads_c, counts_c = _train_step(True, state)
    # The blocks really ran compiled: at least one graph per block kind (graph breaks add more).
    assert counters["stats"]["unique_graphs"] - graphs_before >= 3

    assert abs(loss_c.item() - loss.item()) <= LOSS_TOLERANCE * abs(loss.item())
    assert grads.keys() == grads_c.keys() and len(grads) > 40
    difference = torch.stack([(grads_c[name] - g).norm() for name, g in grads.items()]).norm()
    total = torch.stack([g.norm() for g in grads.values()]).norm()
    print(f"\nloss {loss.item():.9g} vs {loss_c.item():.9g}; gradient difference / norm {(difference / total).item():.2e}")
    assert difference <= GRAD_TOLERANCE * total
    worst = {name: ((grads_c[name] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for name, g in grads.items()}
    print("worst per parameter (relative to its largest entry):", sorted(worst.items(), key=lambda kv: -kv[1])[:3])
    assert max(worst.values()) <= PER_PARAMETER_TOLERANCE, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    assert counts.keys() == counts_c.keys() and len(counts) == 2  # the scored (non-hash) layers
    for name, count in counts.items():
        assert torch.equal(count, counts_c[name]), name
