"""The linear-memory attention backends against the dense reference (CPU, fp32, tiny config).

`blockwise` (query blocks, gathered CSA top-k, recomputing backward) and `flex` (torch FlexAttention
block masks; CSA's sparse phase goes through the gather path) must give the dense backend's outputs,
input gradient, every parameter gradient and indexer loss, for every attention kind and indexer
phase, at sequence lengths that are and are not multiples of the compression ratios.

torch refuses FlexAttention backward on CPU with a device check; the flex cases lift that check
(test only) so that torch's own unfused implementation of the same operator, forward and
backward (incl. the log-sum-exp gradient), runs here. On CUDA the compiled kernel is used instead.
"""

import dataclasses

import pytest
import torch

from conftest import tiny_model_config
from dsv4_train.model import aux_losses

BATCH, HIDDEN = 2, 64
# fp32 throughout; the backends reorder sums (per-block softmax from the log-sum-exp, gradients
# accumulated per block), which moves results by a few fp32 ulps of the largest entry (measured
# <= 6e-7 relative); a wrong mask, block boundary or normalisation moves them by > 1e-3.
RTOL = 1e-6
CASES = [(0, "sparse"), (1, "dense"), (1, "warmup"), (1, "sparse"), (2, "sparse"), (5, "sparse")]


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _run(module, x, upstream):
    module.zero_grad(set_to_none=True)
    aux_losses.drain()
    x = x.clone().requires_grad_(True)
    out = module(x)
    (out * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, aux_losses.drain()


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    import torch.nn.attention.flex_attention as flex

    monkeypatch.setattr(flex, "_validate_device", lambda *args: None)


@pytest.mark.parametrize("seq", [64, 61])
@pytest.mark.parametrize("backend,block", [("blockwise", 16), ("blockwise", 7), ("blockwise", 0), ("flex", 0)])
@pytest.mark.parametrize("layer_index,phase", CASES)
def test_backend_equals_dense(build_attention, cpu_flex_backward, layer_index, phase, backend, block, seq):
    reference_cfg = tiny_model_config(init_std=0.2, indexer_phase=phase, attention_backend="dense")
    cfg = dataclasses.replace(reference_cfg, attention_backend=backend, attention_block_size=block)
    reference = build_attention(reference_cfg, layer_index, seed=3)
    candidate = build_attention(cfg, layer_index, seed=3)
    assert candidate.backend(torch.device("cpu")) == backend
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(seq, BATCH, HIDDEN, generator=gen)
    upstream = torch.randn(seq, BATCH, HIDDEN, generator=gen)

    out_ref, dx_ref, grads_ref, aux_ref = _run(reference, x, upstream)
    out, dx, grads, aux = _run(candidate, x, upstream)
    assert out_ref.abs().max() > 0.1  # O(0.1-1) outputs: the relative bound is meaningful
    assert _relative(out, out_ref) <= RTOL
    assert _relative(dx, dx_ref) <= RTOL
    assert set(grads) == set(grads_ref)
    for name, grad in grads_ref.items():
        assert _relative(grads[name], grad) <= RTOL, name
    assert aux.keys() == aux_ref.keys()
    if layer_index == 1 and phase != "dense":
        assert any(n.startswith("indexer.") for n in grads)  # the KL loss reached the indexer
        assert abs(aux["indexer_loss"] - aux_ref["indexer_loss"]) <= RTOL * abs(aux_ref["indexer_loss"])


def _saved_bytes(module, seq):
    """Bytes of the distinct storages autograd keeps after one forward (what backward will read)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(seq, 1, HIDDEN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    aux_losses.drain()
    return sum(storages.values())


@pytest.mark.parametrize("layer_index,phase", [(0, "sparse"), (1, "sparse"), (2, "sparse")])
def test_blockwise_keeps_linear_memory(build_attention, layer_index, phase):
    """Doubling the sequence doubles what autograd keeps (the dense path quadruples its scores)."""
    cfg = tiny_model_config(indexer_phase=phase, attention_block_size=32)
    dense = build_attention(dataclasses.replace(cfg, attention_backend="dense"), layer_index)
    blockwise = build_attention(dataclasses.replace(cfg, attention_backend="blockwise"), layer_index)
    growth = _saved_bytes(blockwise, 1024) / _saved_bytes(blockwise, 512)
    dense_growth = _saved_bytes(dense, 1024) / _saved_bytes(dense, 512)
    # Linear: 2x (+ the HCA/CSA entries and fixed-size weights); the dense reference shows ~4x.
    assert growth <= 2.1, growth
    assert dense_growth >= 3.0, dense_growth


def test_auto_backend_follows_the_activations_device(build_attention):
    module = build_attention(tiny_model_config(attention_backend="auto"), 1)
    assert module.backend(torch.device("cpu")) == "blockwise"
    assert module.backend(torch.device("cuda")) == "flex"  # decided per call: run.device=cpu on a GPU host stays blockwise
    with pytest.raises(ValueError, match="attention_backend='fused'"):
        build_attention(tiny_model_config(attention_backend="fused"), 1)


@pytest.mark.parametrize("layer_index", [0, 1, 2])
def test_auto_runs_dense_only_when_one_query_block_covers_the_sequence(build_attention, layer_index):
    """`auto` takes the dense path when the linear-memory path would run a single query block (same
    scores, fewer ops), and the plan prices the path the model takes (one rule, model/blocking.py)."""
    from dsv4_train.plan.memory import plan_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for block, short, long in ((32, 32, 33), (0, 64, 4096)):  # an explicit block; the automatic one (tiny: 256)
        cfg = tiny_model_config(attention_backend="auto", attention_block_size=block, indexer_phase="sparse")
        module = build_attention(cfg, layer_index)
        ratio = cfg.compress_ratios[layer_index]
        assert module.backend(cpu, seq_len=short, batch=BATCH) == "dense", (block, short)
        assert module.backend(cuda, seq_len=short, batch=BATCH) == "dense", (block, short)
        assert module.backend(cpu, seq_len=long, batch=BATCH) == "blockwise", (block, long)
        assert module.backend(cuda, seq_len=long, batch=BATCH) == "flex", (block, long)
        for seq, expected in ((short, "dense"), (long, "blockwise")):
            assert plan_backend(cfg, ratio=ratio, seq_length=seq, micro_batch=BATCH, tp=1) == expected
        fixed = build_attention(dataclasses.replace(cfg, attention_backend="blockwise"), layer_index)
        assert fixed.backend(cpu, seq_len=short, batch=BATCH) == "blockwise"  # only auto chooses


def test_flex_refused_without_cuda_before_start():
    from dsv4_train.config.schema import Config
    from dsv4_train.config.validate import ConfigError, validate

    cfg = Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_backend="flex"))
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device="cpu"))
    with pytest.raises(ConfigError, match="attention_backend=flex needs CUDA"):
        validate(cfg, world_size=1)


# bf16 inputs and weights: both backends round the same bf16 products; they differ in fp32
# accumulation order and in where they round back to bf16, a few bf16 ulps (2^-8 = 3.9e-3 relative)
# of the largest entry. 2e-2 still separates them from a wrong mask (> 1e-1 here).
BF16_RTOL = 2e-2


@pytest.mark.parametrize("layer_index,phase", [(0, "sparse"), (1, "sparse"), (1, "warmup"), (2, "sparse")])
def test_blockwise_equals_dense_in_bf16(build_attention, layer_index, phase):
    reference_cfg = tiny_model_config(init_std=0.2, indexer_phase=phase, attention_backend="dense")
    cfg = dataclasses.replace(reference_cfg, attention_backend="blockwise", attention_block_size=16)
    reference = build_attention(reference_cfg, layer_index, seed=3, dtype=torch.bfloat16)
    candidate = build_attention(cfg, layer_index, seed=3, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, BATCH, HIDDEN, generator=gen).bfloat16()
    upstream = torch.randn(64, BATCH, HIDDEN, generator=gen).bfloat16()
    out_ref, dx_ref, grads_ref, _ = _run(reference, x, upstream)
    out, dx, grads, _ = _run(candidate, x, upstream)
    assert out.dtype == torch.bfloat16
    assert _relative(out.float(), out_ref.float()) <= BF16_RTOL
    assert _relative(dx.float(), dx_ref.float()) <= BF16_RTOL
    for name, grad in grads_ref.items():
        assert _relative(grads[name].float(), grad.float()) <= BF16_RTOL, name
