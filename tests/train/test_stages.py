"""The staged schedule (`train.stages`): seq 64 -> 128 -> 256 with the indexer dense -> warmup -> sparse
on the tiny recipe, through the real CLI.

* Both boundaries are crossed: metrics.jsonl carries each step's stage, seq_length and indexer_phase.
* Resume exactly at a boundary (checkpoint of the stage's last step) and just after one (mid-stage)
  reproduces the uninterrupted run's per-step metrics exactly (same data position, same phase, same
  optimizer state; CPU fp32 is deterministic, so the comparison is ==).
* During the indexer warm-up only the lightning indexers change: every other parameter, and the
  noaux_tc expert biases, are bit-identical at the start and the end of the warm-up stage; the
  indexers' are not.
* Bad stage lists are refused before start, naming the stage and the fix.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from dsv4_train.config.derive import derive
from dsv4_train.config.load import compose
from dsv4_train.config.validate import ConfigError, validate
from tests.helpers import by_step, read_metrics, run_cli

STAGES = ("train.stages=[{start_step:2,seq_length:128,indexer_phase:warmup},"
          "{start_step:4,seq_length:256,global_batch_size:4,indexer_phase:sparse}]")
RUN = ["train.max_steps=6", "optim.warmup_steps=1", "train.log_interval=1", "model.indexer_phase=dense",
       "checkpoint.save_interval=1", "checkpoint.keep_last=10", STAGES]
COMPARED = ("lm_loss", "mtp_loss", "grad_norm", "lr", "seq_length", "indexer_phase", "stage")


def test_schedule_is_derived_with_inherited_fields_and_data_offsets():
    cfg = compose(RUN)
    validate(cfg, world_size=1)
    stages = derive(cfg, world_size=1).train_stages
    shape = [(s.first_step, s.last_step, s.seq_length, s.global_batch_size, s.indexer_phase) for s in stages]
    assert shape == [(1, 2, 64, 8, "dense"), (3, 4, 128, 8, "warmup"), (5, 6, 256, 4, "sparse")]
    # Stage 2 starts after 2 x 8 x 64 = 1024 tokens = 1 step of 8 x 128; stage 3 after 1024 + 2048
    # tokens = 3 steps of 4 x 256.
    assert [s.data_offset_steps for s in stages] == [0, 1, 3]
    assert [s.num_microbatches for s in stages] == [2, 2, 1]  # micro_batch_size 4


@pytest.mark.parametrize("overrides,expected", [
    (["train.stages=[{start_step:3},{start_step:3,seq_length:128}]"],
     "train.stages[1].start_step=3 does not come after train.stages[0].start_step=3"),
    (["train.stages=[{start_step:4},{start_step:2}]"], "train.stages[1].start_step=2 does not come after"),
    (["train.stages=[{start_step:2,indexer_phase:warm}]"], "train.stages[0].indexer_phase='warm' is not allowed"),
    (["train.stages=[{start_step:2,seq_length:8192}]"],
     "train.stages[0] (from step 3): train.stages[0].seq_length=8192 exceeds model.max_position_embeddings=4096"),
    (["train.stages=[{start_step:2,global_batch_size:6}]"], "train.stages[0].global_batch_size=6 is not divisible"),
    (["train.stages=[{start_step:-1}]"], "train.stages[0].start_step=-1 must be >= 0"),
])
def test_bad_stage_lists_name_the_stage(overrides, expected):
    with pytest.raises(ConfigError) as error:
        validate(compose(["optim.warmup_steps=1", *overrides]), world_size=1)
    assert expected in str(error.value)


def test_bad_stage_under_context_parallel_is_refused_by_the_cli(tmp_path):
    # seq 100 over cp=2 leaves 50 tokens per rank: not whole compression blocks (ratios 4 and 16).
    result = run_cli(["parallel.cp=2", "parallel.world_size=2", "run.plan_only=true", f"run.dir={tmp_path}/r",
                      "train.stages=[{start_step:2,seq_length:100}]"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "train.stages[0] (from step 3)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("stages") / "full"
    result = run_cli([*RUN, f"run.dir={run_dir}"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, by_step(read_metrics(run_dir)), result.stdout


@pytest.mark.slow
def test_three_stages_cross_both_boundaries(staged_run):
    _, metrics, stdout = staged_run
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    assert [(metrics[s]["seq_length"], metrics[s]["indexer_phase"]) for s in (2, 3, 4, 5)] == [
        (64, "dense"), (128, "warmup"), (128, "warmup"), (256, "sparse")]
    assert "stage 2 (train.stages[0], steps 3-4) of 3: seq_length 128" in stdout
    assert "stage 3/3 seq 256 sparse | step      6/6" in stdout
    # Each stage's tokens per step: 8x64, 8x128, 4x256.
    assert metrics[1]["consumed_samples"] == 8 and metrics[6]["consumed_samples"] == 4 * 8 + 2 * 4


@pytest.mark.slow
@pytest.mark.parametrize("resume_step", [2, 3], ids=["at_boundary", "after_boundary"])
def test_resume_across_a_boundary_is_exact(staged_run, tmp_path, resume_step):
    run_dir, metrics, _ = staged_run
    resumed = tmp_path / "resumed"
    step_dir = f"step_{resume_step:08d}"
    shutil.copytree(run_dir / "checkpoints" / step_dir, resumed / "checkpoints" / step_dir)
    (resumed / "checkpoints" / "latest").write_text(step_dir + "\n")
    result = run_cli([*RUN, f"run.dir={resumed}"], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    again = by_step(read_metrics(resumed))
    assert sorted(again) == list(range(resume_step + 1, 7))
    for step, row in again.items():
        for key in COMPARED:
            assert row[key] == metrics[step][key], (step, key, row[key], metrics[step][key])


def _tensors(checkpoint_dir, optimizer: bool = False) -> dict:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    state = _load_state_dict_from_keys(checkpoint_id=str(checkpoint_dir))
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and "_extra_state" not in k
            and k.startswith("optimizer.state.exp_avg") == optimizer and not k.startswith("optimizer.state.param")}


@pytest.mark.slow
def test_warmup_trains_only_the_indexers(staged_run):
    run_dir, _, _ = staged_run
    before = _tensors(run_dir / "checkpoints" / "step_00000002")  # end of the dense stage
    after = _tensors(run_dir / "checkpoints" / "step_00000004")  # end of the warm-up
    assert before.keys() == after.keys()
    indexer = [k for k in before if ".indexer." in k]
    biases = [k for k in before if k.endswith("expert_bias")]
    assert indexer and biases
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(indexer), sorted(changed - set(indexer))[:5]
    # The indexer's own weights moved (its compressor's too: it is part of the indexer).
    assert any(k.endswith("wq_b.weight") for k in changed), sorted(changed)
    # And the dense stage before it trained everything (the freeze is the warm-up's, not a bug).
    first = _tensors(run_dir / "checkpoints" / "step_00000001")
    assert not torch.equal(first["embedding.word_embeddings.weight"], before["embedding.word_embeddings.weight"])
    # The frozen parameters' Adam moments are untouched too; the indexers' moved.
    moments_before = _tensors(run_dir / "checkpoints" / "step_00000002", optimizer=True)
    moments_after = _tensors(run_dir / "checkpoints" / "step_00000004", optimizer=True)
    moved = {k for k in moments_before if not torch.equal(moments_before[k], moments_after[k])}
    assert moved and all(".indexer." in k for k in moved), sorted(moved)[:5]


@pytest.mark.slow
def test_warmup_freeze_under_expert_parallel_bf16(tmp_path):
    """Two processes, EP2 (Megatron's chained dense + expert optimizer) in bf16 (fp32 main params in
    the distributed optimizer): the warm-up still changes nothing but the indexers."""
    run_dir = tmp_path / "ep2"
    result = run_cli(["train.max_steps=4", "optim.warmup_steps=1", "model.indexer_phase=dense", "parallel.ep=2",
                      "train.precision=bf16", "checkpoint.save_interval=1", "checkpoint.keep_last=10",
                      "train.stages=[{start_step:1,seq_length:128,indexer_phase:warmup},{start_step:3,indexer_phase:sparse}]",
                      f"run.dir={run_dir}"], nproc=2, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    before, after = (_tensors(run_dir / "checkpoints" / f"step_{s:08d}") for s in (1, 3))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".indexer." in k for k in changed), sorted(changed)[:5]
    assert [row["indexer_phase"] for row in read_metrics(run_dir)] == ["dense", "warmup", "warmup", "sparse"]
