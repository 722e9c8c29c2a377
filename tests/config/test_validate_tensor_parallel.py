"""Tensor / sequence / expert-tensor parallel combinations that cannot run are rejected up front,
each problem naming the fields and the fix (dsv4_train/config/validate.py:check_tensor_parallel_sizes)."""

import pytest

from dsv4_train.config.load import compose
from dsv4_train.config.validate import ConfigError, validate

# (overrides, world_size, text that must appear in one problem)
CASES = [
    # TP without SP trains (each MoE sub-layer is sequence-parallel inside, model/moe.py) ...
    (["parallel.tp=2", "parallel.sp=false"], 2, None),
    (["parallel.tp=2", "parallel.sp=false", "parallel.ep=2"], 4, None),
    # ... so it needs the same sequence split as SP: seq_length / cp divisible by tp.
    (["parallel.tp=2", "parallel.sp=false", "train.seq_length=65", "model.compress_ratios=[0,0,0,0,0,0]"], 2,
     "divisible by parallel.cp * parallel.tp"),
    (["parallel.tp=2", "parallel.sp=true", "model.vocab_size=511"], 2, "model.vocab_size=511 is not divisible by parallel.tp=2"),
    (["parallel.tp=2", "parallel.sp=true", "model.moe_intermediate_size=33"], 2, "shared expert width"),
    (["parallel.tp=2", "parallel.sp=true", "model.moe_intermediate_size=33"], 2, "model.moe_intermediate_size=33"),
    (["parallel.tp=2", "parallel.sp=true", "parallel.cp=2", "train.seq_length=128", "train.global_batch_size=4"], 4, None),
    (["parallel.tp=2", "parallel.sp=true", "train.seq_length=65", "model.compress_ratios=[0,0,0,0,0,0]"], 2,
     "divisible by parallel.cp * parallel.tp"),
]


@pytest.mark.parametrize("overrides,world_size,needle", CASES)
def test_rule(overrides, world_size, needle):
    cfg = compose(overrides)
    if needle is None:  # a sound layout passes
        validate(cfg, world_size=world_size)
        return
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size)
    assert any(needle in p and "parallel." in p for p in info.value.problems), info.value.problems


def test_tp_with_sp_passes():
    validate(compose(["parallel.tp=2", "parallel.sp=true", "parallel.ep=2"]), world_size=4)
