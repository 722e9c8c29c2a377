"""Each validation rule rejects a bad config with a message naming the field; all problems at once."""

import dataclasses

import pytest

from dsv4_train.config.load import compose
from dsv4_train.config.validate import ConfigError, validate


def _problems(overrides, world_size=1):
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world_size)
    return info.value.problems


# (overrides, world_size, text that must appear in one problem)
CASES = [
    (["parallel.tp=3"], 6, "parallel.tp=3"),  # heads 4 not divisible by 3
    (["parallel.tp=2"], 3, "world size 3"),
    (["parallel.ep=3"], 3, "num_routed_experts=8 is not divisible by parallel.ep=3"),
    (["parallel.ep=4", "parallel.etp=1"], 2, "ep * parallel.etp"),
    (["parallel.sp=true"], 1, "parallel.sp=true requires parallel.tp > 1"),
    (["parallel.vpp=2"], 1, "parallel.vpp=2 requires parallel.pp > 1"),
    (["parallel.pp=8"], 8, "smaller than parallel.pp * vpp = 8*1 pipeline stages"),
    (["parallel.pp=2", "parallel.pipeline_layout='Et*3|t*3mL'"], 2, "places 6 decoder layers"),
    (["parallel.pp=2", "parallel.pipeline_layout='Et*3|t*2,mX'"], 2, "'X'"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, "train.global_batch_size=6"),
    (["train.global_batch_size=8", "train.micro_batch_size=2"], 3, "micro_batch_size * dp"),
    (["parallel.cp=2", "train.seq_length=40"], 2, "not divisible by compress ratios [16]"),
    (["train.eval_iters=2", "data.split='100,0,0'"], 1, "train.eval_iters=2 needs a validation split"),
    (["train.eval_interval=-1"], 1, "train.eval_interval=-1"),
    (["train.recompute=selective", "train.recompute_modules=[mhc,attention]"], 1,
     "train.recompute_modules has unknown module(s) ['attention']; allowed: ['mhc', 'moe_act']"),
    (["train.recompute=full", "train.recompute_modules=[mhc]"], 1, "needs train.recompute=selective"),
    (["data.document_mask=true", "data.kind=mock"], 1, "data.document_mask=true needs documents"),
    (["parallel.cp=2", "train.seq_length=48"], 2, "per-CP-rank sequence"),
    (["model.compress_ratios=[0,4,16]"], 1, "model.compress_ratios has 3 entries"),
    (["model.compress_ratios=[0,4,16,4,-1,0]"], 1, "contains [-1]"),
    (["model.indexer_phase=always"], 1, "model.indexer_phase='always'"),
    (["model.index_topk=0"], 1, "model.index_topk=0"),
    (["model.num_hash_layers=9"], 1, "model.num_hash_layers=9"),
    (["model.num_experts_per_tok=9"], 1, "model.num_experts_per_tok=9"),
    (["model.qk_rope_head_dim=7"], 1, "model.qk_rope_head_dim=7"),
    (["model.qk_rope_head_dim=64"], 1, "model.qk_rope_head_dim=64"),
    (["model.o_groups=3"], 1, "model.o_groups=3"),
    (["model.hidden_size=0"], 1, "model.hidden_size=0"),
    (["train.precision=fp16"], 1, "train.precision='fp16'"),
    (["optim.decay_style=step"], 1, "optim.decay_style='step'"),
    (["optim.optimizer=lion"], 1, "optim.optimizer='lion' is not allowed; use one of adamw, muon."),
    (["optim.muon_ns_dtype=fp16"], 1, "optim.muon_ns_dtype='fp16' is not allowed; use one of fp32, bf16."),
    (["optim.muon_momentum=1.0"], 1, "optim.muon_momentum=1.0 must be in [0, 1)."),
    (["optim.warmup_steps=500"], 1, "optim.warmup_steps=500"),
    (["optim.lr=1e-5", "optim.min_lr=1e-4"], 1, "below optim.min_lr"),
    (["parallel.moe_dispatcher=deepep"], 1, "parallel.moe_dispatcher='deepep'"),
    (["run.device=tpu"], 1, "run.device='tpu'"),
    (["data=indexed"], 1, "data.kind=indexed needs data.paths"),
    (["checkpoint.load=' '"], 1, "checkpoint.load is empty"),
    (["parallel.world_size=4"], 2, "parallel.world_size=4 but the job was launched with 2"),
    (["train.recompute=some"], 1, "train.recompute='some'"),
]


@pytest.mark.parametrize("overrides,world_size,needle", CASES)
def test_rule(overrides, world_size, needle):
    problems = _problems(overrides, world_size)
    assert any(needle in p for p in problems), problems


def test_every_problem_is_reported_at_once():
    problems = _problems(["parallel.tp=3", "train.precision=fp16", "optim.decay_style=step", "model.index_topk=0"], 3)
    assert len(problems) >= 4
    text = str(ConfigError(problems))
    for field in ("parallel.tp", "train.precision", "optim.decay_style", "model.index_topk"):
        assert field in text


def test_sound_configs_pass():
    validate(compose([]), world_size=1)
    validate(compose(["parallel=cpu_ep2_pp2"]), world_size=4)
    validate(compose(["parallel.tp=2", "parallel.sp=true"]), world_size=2)
    validate(compose(["parallel.ep=2", "parallel.etp=1"]), world_size=2)
    validate(compose(["train.seq_length=61"]), world_size=1)  # trailing tokens are not compressed
    validate(compose(["optim=muon_flash", "train.max_steps=3000"]), world_size=1)


def test_plan_only_needs_no_data_paths():
    cfg = compose(["data=indexed", "run.plan_only=true"])
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError):
        validate(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, plan_only=False)), world_size=1)
