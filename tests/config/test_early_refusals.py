"""Every refusal before start, through the real CLI: one message naming the field or file and the fix,
exit code 2, no traceback, and nothing written (the run directory is not even created).

Cases: non-finite hyper-parameters, an absurd step count, V4 routing rules that used to fire only in
the model builder, an indexer head narrower than RoPE, a run directory under a file, a configured
policy outside its choices, and damaged data (a truncated .bin, a garbled .idx, a NaN blend weight).
"""

from __future__ import annotations

import io
import json

import pytest

from tests.helpers import run_cli


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from dsv4_train.data.preprocess import preprocess
    from dsv4_train.data.tokenizer import train_embedded_tokenizer

    root = tmp_path_factory.mktemp("early_data")
    tokenizer = root / "tokenizer.json"
    train_embedded_tokenizer(tokenizer, vocab_size=512)
    corpus = root / "d.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(200)))
    preprocess(inputs=[str(corpus)], output_prefix=str(root / "d"), tokenizer_path=str(tokenizer),
               progress_stream=io.StringIO())
    return root, tokenizer


CASES = {
    "clip_grad_nan": (["optim.clip_grad=nan"], "optim.clip_grad=nan: NaN or infinite"),
    "lr_inf": (["optim.lr=inf"], "optim.lr=inf"),
    "absurd_steps": (["train.max_steps=1000000000000000"], "samples is beyond any dataset index"),
    "score_function": (["model.score_function=sigmoid"], "model.score_function='sigmoid'"),
    "top1": (["model.num_experts_per_tok=1"], "model.num_experts_per_tok=1"),
    "indexer_narrower_than_rope": (["model.index_head_dim=4"], "model.index_head_dim=4 must be >= model.qk_rope_head_dim=8"),
    "negative_coefficient": (["model.seq_aux_loss_coeff=-1"], "model.seq_aux_loss_coeff must be finite and >= 0"),
    "nonfinite_policy": (["train.on_nonfinite=ignore"], "train.on_nonfinite='ignore' is not allowed"),
    "spike_nan": (["train.spike_factor=nan"], "train.spike_factor=nan must be >= 0"),
    "verify_mode": (["checkpoint.verify=fast"], "checkpoint.verify='fast' is not allowed"),
    "sinkhorn_kernel": (["model.sinkhorn_kernel=fused"], "model.sinkhorn_kernel='fused' is not allowed"),
    "compile_not_bool": (["model.compile=maybe"], "Wrong type for 'model.compile'"),
    "compile_backend": (["model.compile_backend=cudagraphs"], "model.compile_backend='cudagraphs' is not allowed"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_refusals(tmp_path, case):
    overrides, expected = CASES[case]
    result = run_cli([*overrides, f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_run_dir_under_a_file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    result = run_cli([f"run.dir={tmp_path / 'a_file' / 'run'}"], timeout=120)
    assert result.returncode == 2 and "exists and is not a directory" in result.stderr, result.stderr[-2000:]


def _damage_bin(root):
    (root / "d.bin").write_bytes((root / "d.bin").read_bytes()[:-10])
    return "d.bin has", "(truncated, or the .bin of another dataset)"


def _damage_idx(root):
    (root / "d.idx").write_bytes(b"garbage" * 10)
    return "d.idx cannot be read", "re-create the dataset with dsv4-preprocess"


@pytest.mark.parametrize("damage", [_damage_bin, _damage_idx], ids=["truncated_bin", "garbled_idx"])
def test_damaged_data_is_refused(dataset, tmp_path, damage):
    import shutil

    source, tokenizer = dataset
    root = tmp_path / "data"
    shutil.copytree(source, root)
    first, second = damage(root)
    result = run_cli(["data=indexed", f"data.paths=[{root / 'd'}]", f"data.tokenizer={tokenizer}",
                      "data.document_mask=false", f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert first in result.stderr and second in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_nan_blend_weight(dataset, tmp_path):
    root, tokenizer = dataset
    result = run_cli(["data=indexed", f"data.paths=['nan {root / 'd'}']", f"data.tokenizer={tokenizer}",
                      f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode == 2 and "blend weights must be finite and > 0" in result.stderr, result.stderr[-2000:]


def test_checkpoint_space_is_checked(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from dsv4_train.config.load import compose
    from dsv4_train.launch import output_dirs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    cfg = compose([f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=r"has 0.00 GiB free but one checkpoint of this model needs about"):
        output_dirs.check_output_dirs(cfg, str(tmp_path / "run" / "checkpoints"))
