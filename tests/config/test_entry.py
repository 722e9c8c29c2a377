"""The @hydra.main path as real subprocesses: --cfg job, -m multirun with one run.dir per job, and
bad inputs reported as one message with exit status 2 and no traceback.

The entry under test is a minimal script wired exactly as dsv4_train/__main__.py should be
(`@hydra.main(config_path=CONFIG_DIR, ...)` + `run_with_friendly_errors`), whose task only records
the typed config, so these tests exercise configuration and not training.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, uuid
    import hydra
    from dsv4_train.config.load import CONFIG_DIR, exit_on_config_error, run_with_friendly_errors, to_typed

    @hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
    @exit_on_config_error
    def entry(dcfg):
        cfg = to_typed(dcfg)
        with open(os.path.join(os.environ["RECORD_DIR"], f"job{uuid.uuid4().hex}.json"), "w") as f:
            json.dump({"run_dir": cfg.run.dir, "max_steps": cfg.train.max_steps, "model": cfg.model.name}, f)

    if __name__ == "__main__":
        run_with_friendly_errors(entry)
    """
)


@pytest.fixture()
def entry(tmp_path):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    record = tmp_path / "records"
    record.mkdir()

    def run(*args):
        env = {**os.environ, "RECORD_DIR": str(record), "TORCHDYNAMO_DISABLE": "1"}
        env.pop("HYDRA_FULL_ERROR", None)
        env.pop("WORLD_SIZE", None)
        proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        jobs = [json.loads(p.read_text()) for p in sorted(record.glob("*.json"))]
        return proc, jobs

    return run


def test_cfg_job_prints_the_config(entry):
    proc, jobs = entry("conf=flash_pretrain", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: flash" in proc.stdout and "compress_ratios" in proc.stdout and not jobs


def test_run_writes_into_its_hydra_output_dir(entry, tmp_path):
    proc, jobs = entry("train.max_steps=30")
    assert proc.returncode == 0, proc.stderr
    (job,) = jobs
    assert job["max_steps"] == 30 and job["run_dir"].startswith(str(tmp_path / "runs" / "tiny_pretrain"))


def test_multirun_jobs_get_distinct_run_dirs(entry, tmp_path):
    proc, jobs = entry("-m", "train.max_steps=21,22")
    assert proc.returncode == 0, proc.stderr
    assert sorted(j["max_steps"] for j in jobs) == [21, 22]
    dirs = {j["run_dir"] for j in jobs}
    assert len(dirs) == 2 and all(d.startswith(str(tmp_path / "multirun")) for d in dirs)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model.hidden_sise=8"], "model.hidden_sise"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["conf=nope"], "conf=nope"),
        (["parallel=nope"], "parallel=nope"),
        (["-m", "train.precision=fp32,fp16"], "train.precision='fp16'"),  # invalid sweep value
        (["parallel.tp=3"], "parallel.tp=3"),  # validate(): caught before Hydra runs
    ],
)
def test_bad_input_is_one_message_exit_2(entry, args, needle):
    proc, jobs = entry(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr
    assert not jobs
