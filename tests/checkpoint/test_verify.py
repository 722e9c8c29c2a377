"""Checkpoint manifests (checkpoint/manifest.py): damage is found before anything loads.

A 4-step run saves at steps 2 and 4. Every file of the step-4 checkpoint (the completion marker
included), bit-flipped or truncated, is found by verification (in-process, no load). Then the
checkpoint is damaged in one way per CLI case (a bit flip, a truncation, a deleted file, a planted
extra file, a changed or truncated completion marker); resuming reports the checkpoint, the file
and the reason, falls back to step 2, and re-trains steps 3-4 to exactly the losses of the original
run (==, CPU fp32 is deterministic). An explicitly requested damaged checkpoint is refused (exit 2).
"""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import by_step, read_metrics, run_cli

RUN = ["train.max_steps=4", "optim.warmup_steps=1", "checkpoint.save_interval=2", "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("verify") / "run"
    result = run_cli([*RUN, f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _marker_step_changed(step_dir):
    """A one-bit change that leaves valid JSON: step 4 -> 5 (only the marker's own seal can catch it)."""
    marker = step_dir / "dsv4_complete.json"
    text = marker.read_text()
    assert '"step": 4,' in text
    marker.write_text(text.replace('"step": 4,', '"step": 5,', 1))
    return marker


def _marker_truncated(step_dir):
    _truncate(step_dir / "dsv4_complete.json")
    return step_dir / "dsv4_complete.json"


DAMAGE = {
    "marker_bit_flip": (_marker_step_changed, ": checksum mismatch (the completion marker changed", []),
    "marker_truncated": (_marker_truncated, ": unreadable", []),
    "bit_flip": (lambda d: (_flip(d / "__0_0.distcp"), d / "__0_0.distcp")[1], "checksum mismatch", []),
    "truncated_size_check": (lambda d: (_truncate(d / "rng" / "rank_0.pt"), d / "rng" / "rank_0.pt")[1],
                             "(truncated or rewritten)", ["checkpoint.verify=size"]),
    "deleted": (lambda d: ((d / ".metadata").unlink(), d / ".metadata")[1], ": missing", []),
    "extra_file": (lambda d: ((d / "extra.pt").write_bytes(b"x"), d / "extra.pt")[1], "not in the checkpoint's manifest", []),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_latest_falls_back_exactly(original, tmp_path, case):
    damage, reason, extra = DAMAGE[case]
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    damaged = damage(run_dir / "checkpoints" / "step_00000004")
    result = run_cli([*RUN, *extra, f"run.dir={run_dir}"], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_00000004'} failed verification" in result.stdout
    assert f"{damaged}{reason}" in result.stdout or (str(damaged) in result.stdout and reason in result.stdout)
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} at step 2" in result.stdout
    before, after = by_step(read_metrics(original)), by_step(read_metrics(run_dir))
    assert sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):
        assert after[step]["lm_loss"] == before[step]["lm_loss"], step


@pytest.mark.slow
def test_explicitly_requested_damaged_checkpoint_is_refused(original, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(original / "checkpoints" / "step_00000004", source / "step_00000004")
    _flip(source / "step_00000004" / "__0_0.distcp")
    result = run_cli([*RUN, f"run.dir={tmp_path / 'new'}", f"checkpoint.load={source / 'step_00000004'}",
                      "checkpoint.load_model_only=true"], timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "failed verification" in result.stderr and "__0_0.distcp: checksum mismatch" in result.stderr


def _every_file(step_dir):
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["bit_flip", "truncated"])
def test_damage_to_any_file_is_detected(original, tmp_path, damage):
    """Each file of a real checkpoint, damaged alone, is named by verification (full; truncation also
    by size); the intact copy passes."""
    from dsv4_train.checkpoint.io import checkpoint_problems

    source = original / "checkpoints" / "step_00000004"
    assert checkpoint_problems(str(source), "full") == []
    names = [p.relative_to(source) for p in _every_file(source)]
    assert {".metadata", "dsv4_complete.json", "rng/rank_0.pt"} <= {str(n) for n in names}, names
    assert any(n.suffix == ".distcp" for n in names), names
    modes = ["full", "size"] if damage is _truncate else ["full"]
    for name in names:
        copy = tmp_path / f"{name}".replace("/", "_")
        shutil.copytree(source, copy)
        damage(copy / name)
        for mode in modes:
            problems = checkpoint_problems(str(copy), mode)
            assert problems and all(str(copy / name) in p for p in problems), (name, mode, problems)
    print(f"{damage.__name__}: detected in each of {len(names)} files: {', '.join(map(str, names))}")
