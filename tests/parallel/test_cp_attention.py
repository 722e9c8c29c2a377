"""Context-parallel HybridAttention against the unsplit module, in a gloo world of 2 processes.

Each rank builds the same attention (same seed), runs the full 64-token sequence unsplit with the
dense backend (the reference) and its contiguous 32-token slice with each backend with a `ContextParallelSlice`; outputs, the input
gradient, the parameter gradients (summed over CP, as DDP does up to its 1/cp average) and the
indexer KL loss (ranks' shares summed) must match. Tiny config, window 8, CSA ratio 4 with top-4,
HCA ratio 16: the window, the CSA overlap block and the top-k all cross the split.
"""

import dataclasses
import itertools
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))

SEQ, BATCH, HIDDEN = 64, 2, 64
# fp32; CP changes only summation order (gathered keys, gradients summed over ranks): observed
# differences are ~1e-7 relative; 1e-5 relative still catches any wrong mask, halo or normalisation
# (those move values by >1e-3).
RTOL = 1e-5
CASES = [(0, "sparse"), (1, "sparse"), (1, "warmup"), (2, "sparse"), (5, "sparse")]  # 5 = the MTP layer
# The reference is always the unsplit DENSE module; the CP slice runs each backend (blockwise with
# blocks of 8 queries, so blocks, the halo and the top-k all cross the split).
BACKENDS = ("dense", "blockwise")
# Packed documents (second pass): boundaries and compression blocks of both ratios straddle the
# split at 32 (row 0: document 5..44 has a 16-block 21..36 and 4-blocks across 32; row 1 likewise).
DOCUMENTS = [[5, 40, 3, 16], [17, 9, 38]]


def _segments(lengths):
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _worker(rank: int, world: int, store_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    from dsv4_train.mcore import cpu_compat

    cpu_compat.apply()
    # A file rendezvous: a port picked here could be taken before rank 0 binds it (pytest -n 2).
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(context_parallel_size=world)
    from conftest import tiny_model_config, transformer_config_for

    from dsv4_train.model import aux_losses
    from dsv4_train.model.attention import HybridAttention
    from dsv4_train.parallel import context as cp_context

    group = parallel_state.get_context_parallel_group()
    local = SEQ // world
    rows = slice(rank * local, (rank + 1) * local)
    results = {}
    from dsv4_train.model.documents import Documents

    segments = torch.stack([_segments(lengths) for lengths in DOCUMENTS])  # [B, S]
    runs = [(case, backend, False) for case, backend in itertools.product(CASES, BACKENDS)]
    runs += [(case, backend, True) for case, backend in itertools.product(CASES, BACKENDS)]
    for (layer_index, phase), backend, packed in runs:
        ref_cfg = tiny_model_config(init_std=0.2, indexer_phase=phase, attention_backend="dense")
        cfg = dataclasses.replace(ref_cfg, attention_backend=backend, attention_block_size=8)
        torch.manual_seed(0)
        reference = HybridAttention(config=transformer_config_for(ref_cfg), model_cfg=ref_cfg, layer_index=layer_index)
        torch.manual_seed(0)
        module = HybridAttention(config=transformer_config_for(cfg), model_cfg=cfg, layer_index=layer_index)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
        weight = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)

        # Reference: the unsplit sequence.
        full_docs = Documents.from_segment_ids(segments) if packed else None
        full_x = x.clone().requires_grad_(True)
        full_out = reference(full_x, documents=full_docs)
        (full_out * weight).sum().backward()
        full_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
        full_aux = aux_losses.drain()

        # This rank's contiguous slice.
        part_x = x[rows].clone().requires_grad_(True)
        positions = torch.arange(SEQ)[rows]
        cp = cp_context.build_slice(positions, group=group, halo=cp_context.halo_size(cfg))
        part_docs = Documents.from_segment_ids(segments, offset=cp.offset, local_len=local) if packed else None
        part_out = module(part_x, position_ids=positions, cp=cp, documents=part_docs)
        (part_out * weight[rows]).sum().backward()
        part_aux = aux_losses.drain()
        case = f"{backend}-layer{layer_index}-{phase}" + ("-documents" if packed else "")
        results[f"{case}/out"] = _relative(part_out.detach(), full_out.detach()[rows])
        results[f"{case}/dx"] = _relative(part_x.grad, full_x.grad[rows])
        assert set(full_grads) == {n for n, p in module.named_parameters() if p.grad is not None}, case
        for name, param in module.named_parameters():
            summed = param.grad.clone()
            torch.distributed.all_reduce(summed, group=group)
            results[f"{case}/grad:{name}"] = _relative(summed, full_grads[name])
        for name, value in full_aux.items():
            share = torch.tensor(part_aux[name], dtype=torch.float64)
            torch.distributed.all_reduce(share, group=group)
            results[f"{case}/aux:{name}"] = abs(float(share) - value) / max(abs(value), 1e-12)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_context_parallel_attention_matches_unsplit(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    worst = {}
    for rank in range(2):
        for key, value in torch.load(tmp_path / f"rank{rank}.pt").items():
            worst[key] = max(worst.get(key, 0.0), value)
    assert any(k.endswith("aux:indexer_loss") for k in worst), sorted(worst)  # the indexer loss was compared
    print("\nCP2 attention vs unsplit, max relative difference:")
    for key in sorted(worst):
        print(f"  {key:<58} {worst[key]:.2e}")
    bad = {k: v for k, v in worst.items() if not v <= RTOL}
    assert not bad, bad
