"""Selective recompute (model/recompute.py) changes memory, not numbers: the tiny V4 model (5 layers,
MTP, hash and scored MoE, CSA/HCA/sliding attention), fp32, one forward + backward with and without
each module and the default set, with each expert path.

Tolerance 1e-6 relative (to the largest entry of each tensor, per parameter gradient; the loss
relative to itself): the recomputed forward repeats the same fp32 ops in the same order, so any
difference would be a recompute bug (a wrong RNG state, a stale or half-restored tensor).
Measured: bitwise equal (0.0) on loss and every gradient (model/block.py keeps the stream mixing
inside the recomputed part so the streams' gradient sums its parts in the same order; with the
mixing outside, reordered fp32 sums gave up to 5e-6 on mHC scale/base gradients). The number of recomputed forwards is
counted too, so a module silently not recomputed fails (equal numbers alone cannot show it).
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.tensor_parallel.random import CheckpointWithoutOutput
from v4_model_helpers import tiny_cfg, tokens

TOLERANCE = 1e-6  # relative; see the module docstring
CASES = [("mhc",), ("moe_act",), ()]  # () = the default set


def _run(expert_compute: str, modules, monkeypatch):
    from dsv4_train.model import aux_losses, recompute
    from dsv4_train.model.builder import build_model
    from dsv4_train.model.transformer_config import build_transformer_config

    cfg = tiny_cfg(moe_expert_compute=expert_compute)
    config = build_transformer_config(model_cfg=cfg)
    recompute.configure(config, "selective" if modules is not None else "none", modules or [])
    torch.manual_seed(0)
    model = build_model(model_cfg=cfg, transformer_config=config).train()
    recomputed = []
    original = CheckpointWithoutOutput._recompute

    def counting(self, grad):  # a spy on Megatron's own method: counts the recomputed forwards
        recomputed.append(self.ctx is not None)
        return original(self, grad)

    monkeypatch.setattr(CheckpointWithoutOutput, "_recompute", counting)
    ids = tokens(cfg, batch=2, seq=64)
    loss = model(ids, labels=torch.roll(ids, -1, dims=1)).sum()
    loss.backward()
    aux_losses.drain()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return cfg, loss.detach(), grads, sum(recomputed)


@pytest.mark.parametrize("expert_compute", ["grouped", "sequential", "batched"])
@pytest.mark.parametrize("modules", CASES, ids=lambda m: "+".join(m) or "default")
def test_selective_recompute_equals_none(megatron_world1, monkeypatch, expert_compute, modules):
    cfg, loss, grads, none_count = _run(expert_compute, None, monkeypatch)
    _, loss_sel, grads_sel, count = _run(expert_compute, modules, monkeypatch)
    blocks = cfg.num_layers + cfg.mtp_num_layers
    experts_per_layer = cfg.num_routed_experts if expert_compute == "sequential" else 1
    expected = {"mhc": 2 * blocks, "moe_act": blocks * experts_per_layer}
    assert none_count == 0
    assert count == sum(expected[m] for m in (modules or expected)), (count, expected)
    assert abs(loss_sel - loss) <= TOLERANCE * abs(loss)
    assert grads.keys() == grads_sel.keys()
    worst = 0.0
    for name, grad in grads.items():
        error = (grads_sel[name] - grad).abs().max().item() / max(grad.abs().max().item(), 1e-30)
        worst = max(worst, error)
        assert error <= TOLERANCE, (name, error)
    print(f"\n{expert_compute} {modules or 'default'}: loss {abs(loss_sel - loss) / abs(loss):.1e}, "
          f"worst gradient {worst:.1e}, recomputed forwards {count}")


@pytest.mark.parametrize("modules,expected", [([], ("mhc", "moe_act")), (["moe_act"], ("moe_act",))])
def test_trainer_model_carries_the_selection(megatron_world1, modules, expected):
    """The trainer's model (train/loop.py) hands the selection to every block and expert module,
    including the MoE's copied configs: a selection lost on the way would skip recompute silently."""
    from dsv4_train.config.load import compose
    from dsv4_train.model.block import V4Block
    from dsv4_train.model.grouped_experts import GroupedExperts
    from dsv4_train.train.loop import build_model_chunks

    cfg = compose(["conf=tiny_pretrain", "train.recompute=selective", f"train.recompute_modules=[{','.join(modules)}]"])
    (chunk,) = build_model_chunks(cfg)
    checked = [m for m in chunk.modules() if isinstance(m, (V4Block, GroupedExperts))]
    assert len(checked) == 2 * (cfg.model.num_layers + cfg.model.mtp_num_layers)
    assert all(m.config.dsv4_recompute_modules == expected for m in checked)
