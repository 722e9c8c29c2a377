"""The plan of a staged run: every stage's per-rank memory, the long-context recipes fitting their
clusters, and a stage that does not fit refused by the CLI naming the stage and a fix that fits."""

import pytest

from dsv4_train.config.load import compose
from dsv4_train.plan import format_plan, make_plan, refusal
from tests.helpers import run_cli

GIB_80GB = 80e9 / 2**30


@pytest.mark.parametrize("recipe,cluster", [("flash_long_context", 128), ("pro_long_context", 1024)])
def test_long_context_recipes_fit_every_stage(recipe, cluster):
    plan = make_plan(compose([f"conf={recipe}"]))
    stages = plan["train_stages"]
    assert plan["layout"]["world_size"] == cluster and plan["fits"], format_plan(plan)
    assert [(s["seq_length"], s["indexer_phase"]) for s in stages] == [
        (4096, "dense"), (16384, "dense"), (65536, "warmup"), (65536, "sparse")]
    assert all(s["max_rank_memory_gib"] < GIB_80GB for s in stages)
    # Longer sequences need more activation memory at the same tokens per step.
    assert stages[0]["max_rank_memory_gib"] < stages[1]["max_rank_memory_gib"] < stages[2]["max_rank_memory_gib"]
    assert len({s["tokens_per_step"] for s in stages}) == 1
    assert refusal(plan) is None


def test_a_stage_that_does_not_fit_is_refused_with_a_fix(tmp_path):
    # flash_long_context with CP4 instead of CP8: its 64K stages need ~82 GiB (measured by the plan).
    result = run_cli(["conf=flash_long_context", "run.plan_only=true", "parallel.cp=4", f"run.dir={tmp_path}"])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "stage 3 (train.stages[1], steps 13001-13500) with seq_length 65536" in result.stderr
    assert "fix: parallel.cp=8" in result.stderr and "Traceback" not in result.stderr
    plan = make_plan(compose(["conf=flash_long_context", "parallel.cp=8"]))
    assert plan["fits"]  # the fix named in the message does fit
