"""Bad input through the real CLI: non-zero exit, one clear message naming the field or file,
no traceback, and nothing written to the run directory."""

import pytest

from tests.helpers import run_cli

CASES = {
    "unknown_key": (["train.bogus_key=1"], "bogus_key"),
    "wrong_type": (["train.max_steps=lots"], "max_steps"),
    "unknown_recipe": (["conf=no_such_recipe"], "no_such_recipe"),
    "unknown_group_option": (["model=gigantic"], "gigantic"),
    "tp_not_dividing_heads": (["parallel.tp=3"], "parallel.tp"),
    "world_size_does_not_factorize": (["parallel.pp=2"], "world size"),
    "experts_not_divisible_by_ep": (["parallel.ep=3"], "parallel.ep"),
    "seq_over_max_positions": (["train.seq_length=8192"], "max_position_embeddings"),
    "batch_not_divisible": (["train.global_batch_size=3", "train.micro_batch_size=2"], "global_batch_size"),
    "bad_precision": (["train.precision=fp8"], "precision"),
    "bad_decay_style": (["optim.decay_style=zigzag"], "decay_style"),
    "ratios_length": (["model.compress_ratios=[0,4]"], "compress_ratios"),
    "missing_data_path": (["data.kind=indexed", "data.paths=[/nonexistent/corpus_text_document]"], "/nonexistent/corpus_text_document"),
    "missing_checkpoint": (["checkpoint.load=/nonexistent/ckpt"], "checkpoint.load"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_cleanly(name, tmp_path):
    overrides, needle = CASES[name]
    run_dir = tmp_path / "run"
    proc = run_cli(["conf=tiny_pretrain", f"run.dir={run_dir}", *overrides], timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    assert needle in output, output
    assert not run_dir.exists(), f"{name} wrote {list(run_dir.rglob('*'))}"


def test_unreadable_tokenizer_fails_cleanly(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{ this is not a tokenizer")
    run_dir = tmp_path / "run"
    proc = run_cli(["conf=tiny_pretrain", f"run.dir={run_dir}", f"data.tokenizer={bad}"], timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in output, output
    assert str(bad) in output, output
    assert not run_dir.exists()
