"""Unwritable `run.dir` / `checkpoint.dir` are refused before start (launch/output_dirs.py), through
the real CLI: exit 2, one message naming the field, the path and the fix, no traceback, and nothing
written anywhere under the test's directory.

Cases that hold as root (the test machines run as root, where permission bits do not stop writes): a
path through a regular file, a checkpoint.dir that is a file, and an immutable directory (`chattr +i`
stops root too; skipped where the file system does not support it). The permission-bit cases are
skipped as root.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import run_cli

AS_ROOT = os.geteuid() == 0


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _refused(tmp_path, overrides, *, field, path, reason):
    before = _tree(tmp_path)
    result = run_cli(overrides, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"{field}={path}: " in result.stderr and reason in result.stderr, result.stderr
    assert f"choose a writable {field}" in result.stderr or f"choose another {field}" in result.stderr
    assert _tree(tmp_path) == before, "a refused launch wrote files"


def test_run_dir_through_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    run_dir = tmp_path / "a_file" / "run"
    _refused(tmp_path, [f"run.dir={run_dir}"], field="run.dir", path=run_dir,
             reason=f"{tmp_path / 'a_file'} exists and is not a directory")


def test_checkpoint_dir_through_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    ckpt = tmp_path / "a_file" / "ckpt"
    _refused(tmp_path, [f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={ckpt}"], field="checkpoint.dir", path=ckpt,
             reason=f"{tmp_path / 'a_file'} exists and is not a directory")


def test_checkpoint_dir_is_a_file(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.write_text("x")
    _refused(tmp_path, [f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={ckpt}"], field="checkpoint.dir", path=ckpt,
             reason=f"{ckpt} exists and is not a directory")


@pytest.fixture()
def immutable(tmp_path):
    """A directory with the immutable attribute (cleared again afterwards)."""
    directory = tmp_path / "frozen"
    directory.mkdir()
    made = subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {made.stderr.strip()}")
    yield directory
    subprocess.run(["chattr", "-i", str(directory)], check=True)


def test_run_dir_in_an_immutable_directory(tmp_path, immutable):
    run_dir = immutable / "run"
    _refused(tmp_path, [f"run.dir={run_dir}"], field="run.dir", path=run_dir,
             reason=f"{immutable} is not writable by this process")


def test_checkpoint_dir_immutable(tmp_path, immutable):
    _refused(tmp_path, [f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={immutable}"], field="checkpoint.dir",
             path=immutable, reason=f"{immutable} is not writable by this process")


@pytest.fixture()
def read_only(tmp_path):
    directory = tmp_path / "read_only"
    directory.mkdir()
    directory.chmod(0o555)
    yield directory
    directory.chmod(0o755)


@pytest.mark.skipif(AS_ROOT, reason="root writes through permission bits; the immutable cases cover root")
def test_run_dir_without_write_permission(tmp_path, read_only):
    run_dir = read_only / "run"
    _refused(tmp_path, [f"run.dir={run_dir}"], field="run.dir", path=run_dir,
             reason=f"{read_only} is not writable by this process")


@pytest.mark.skipif(AS_ROOT, reason="root writes through permission bits; the immutable cases cover root")
def test_checkpoint_dir_without_write_permission(tmp_path, read_only):
    ckpt = read_only / "ckpt"
    _refused(tmp_path, [f"run.dir={tmp_path / 'run'}", f"checkpoint.dir={ckpt}"], field="checkpoint.dir", path=ckpt,
             reason=f"{read_only} is not writable by this process")
