"""`python -m dsv4_train.convert import|export|verify` through the real CLI.

* A tiny V4 in DeepSeek's release format (tests/bridge/test_release_format.py's quantiser: FP8 with
  E8M0 scales over 48 x 48 blocks, so 64-wide weights end in partial tiles, packed FP4 experts, bf16
  elsewhere and fp32 where the release keeps fp32; MTP tensors included; two shards with an index):
  - import -> our model's logits equal transformers' on the dequantised weights within 1e-5 (the
    tolerance of every HF parity test: only the order of float sums differs), MTP tensors equal the
    dequantised source bit for bit, and `verify` reports every tensor exact;
  - import (bf16 storage, which holds FP8/FP4 values exactly) -> export --format official --dtype fp8
    --experts fp4 --like RELEASE reproduces every tensor's bytes, scales included (and without --like
    only blocks whose scale the dequantised values leave ambiguous differ, each by one exponent);
  - export --format hf loads with transformers' `from_pretrained` and gives its logits exactly.
* Layouts: a checkpoint imported by two processes loads under TP2+EP2 and PP2 (dist_checkpointing
  reshards it); each layout saves it again, and exporting those saves gives back the source bytes.
* Bad input: refused with the file or tensor named, exit 2, nothing left at OUT.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_oracle import CASES, build_hf, input_ids, save_hf
from test_release_format import BLOCK, FP4_NAMES, FP8_NAMES, decode_fp4, decode_fp8, quantize_fp4, quantize_fp8
from tests.helpers import run_cli

CASE = CASES[0]
MTP_FP8 = re.compile(r"^mtp\.\d+\.(e_proj|h_proj)\.weight$")  # FP8 in the release too
RELEASE_FP32 = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")


def convert(*args, nproc: int = 1):
    return run_cli([*map(str, args), "--progress-every", "0"], nproc=nproc, module="dsv4_train.convert", timeout=600)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _our_mtp_tensors(plain_dir: str) -> dict:
    """Native-named MTP tensors (transformers has none): those of our model built from the plain checkpoint."""
    from dsv4_train.bridge import load_hf
    from dsv4_train.bridge.hf import native_sources

    with pytest.warns(UserWarning, match="no MTP weights"):
        model = load_hf(plain_dir)
    out = {}
    for name, value in model.state_dict().items():
        if name.startswith("mtp.") and not name.endswith("_extra_state"):
            sources = native_sources(name)
            for native, piece in zip(sources, value.chunk(len(sources), dim=0)):
                out[native] = piece.clone()
    return out


@pytest.fixture(scope="module")
def release(megatron_world1, tmp_path_factory):
    """{"release": dir, "dequantized": HF dir (fp32, no MTP), "hf": transformers model, "tensors": release tensors,
    "mtp": dequantised MTP tensors}."""
    from transformers import DeepseekV4ForCausalLM

    from dsv4_train.bridge.hf import hf_name, native_name

    root = tmp_path_factory.mktemp("convert")
    plain = save_hf(build_hf(CASE), str(root / "plain"))
    natives = {native_name(n): t for n, t in load_file(os.path.join(plain, "model.safetensors")).items()}
    natives.update(_our_mtp_tensors(plain))
    stored, dequantized = {}, {}
    for name, w in sorted(natives.items()):
        if FP8_NAMES.search("." + name) or MTP_FP8.search(name):
            q, s = quantize_fp8(w, BLOCK)
            stored[name], stored[name[:-len("weight")] + "scale"] = q, s
            dequantized[name] = decode_fp8(q, s, BLOCK)
        elif FP4_NAMES.search("." + name):
            q, s = quantize_fp4(w)
            stored[name], stored[name[:-len("weight")] + "scale"] = q, s
            dequantized[name] = decode_fp4(q, s)
        elif not w.is_floating_point():
            stored[name] = dequantized[name] = w.to(torch.int64)
        elif RELEASE_FP32.search(name):
            stored[name] = dequantized[name] = w.float()
        else:
            stored[name] = w.to(torch.bfloat16)
            dequantized[name] = stored[name].float()
    assert any(n.startswith("mtp.") and n.endswith("scale") for n in stored)
    release_dir = root / "release"
    release_dir.mkdir()
    names = sorted(stored)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file_name, part in halves.items():
        save_file({n: stored[n].contiguous() for n in part}, str(release_dir / file_name))
    (release_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, part in halves.items() for n in part}}))
    config = json.loads((root / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                     "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    (release_dir / "config.json").write_text(json.dumps(config))
    hf_dir = root / "dequantized"
    hf_dir.mkdir()
    shutil.copy(root / "plain" / "config.json", hf_dir / "config.json")
    save_file({hf_name(n): t.contiguous() for n, t in dequantized.items() if not n.startswith("mtp.")},
              str(hf_dir / "model.safetensors"))
    hf = DeepseekV4ForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    mtp = {n: t for n, t in dequantized.items() if n.startswith("mtp.")}
    return {"root": root, "release": str(release_dir), "dequantized": str(hf_dir), "hf": hf, "tensors": stored,
            "mtp": mtp}


def _model_from_checkpoint(path: str):
    from dsv4_train.checkpoint.io import load_checkpoint
    from dsv4_train.convert.checkpoint_reader import model_config_of
    from dsv4_train.model.builder import build_model
    from dsv4_train.model.transformer_config import build_transformer_config

    model_cfg = model_config_of(path)
    model = build_model(model_cfg=model_cfg, transformer_config=build_transformer_config(model_cfg=model_cfg,
                                                                                            precision="fp32"))
    load_checkpoint(path, model_chunks=[model], optimizer=None, scheduler=None, model_only=True)
    return model.eval()


@pytest.fixture(scope="module")
def imported(release):
    out = release["root"] / "imported_fp32"
    proc = _ok(convert("import", release["release"], out, "--dtype", "fp32"))
    assert re.search(r"dequantised \d+ FP8 and \d+ FP4 weights; MTP imported", proc.stdout), proc.stdout
    return str(out)


def test_import_gives_transformers_logits_and_the_release_mtp(release, imported):
    from dsv4_train.bridge.hf import native_sources

    model = _model_from_checkpoint(imported)
    ids = input_ids(CASE)
    with torch.no_grad():
        difference = (model(ids) - release["hf"](ids).logits).abs().max().item()
    assert difference <= 1e-5, difference
    state = model.state_dict()
    mtp_names = [n for n in state if n.startswith("mtp.") and not n.endswith("_extra_state")]
    assert len(mtp_names) > 20
    for name in mtp_names:
        expected = torch.cat([release["mtp"][s] for s in native_sources(name)], dim=0)
        assert torch.equal(state[name], expected), name
    report = _ok(convert("verify", release["release"], imported)).stdout
    assert "verify: OK" in report and "DIFFERS" not in report, report


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_mtp_loss_equals_a_direct_computation_from_the_release_tensors(release, imported):
    """The MTP depth's loss from the imported model equals the formula written here from the release's
    own tensors by their official names (e_proj on the embedding of token t+1, h_proj on the main
    streams, hc_head, norm, the shared head), around our block module: a swapped or misnamed MTP
    tensor shows up. fp32; 1e-6 relative: the same maths in another order of float sums."""
    model = _model_from_checkpoint(imported)
    cfg = model.model_cfg
    t = {n: v.float() for n, v in release["mtp"].items()}
    embed = release["tensors"]["embed.weight"].float()
    head = release["tensors"]["head.weight"].float()
    ids = input_ids(CASE)
    captured = {}
    model.hc_head.register_forward_pre_hook(lambda module, args: captured.setdefault("streams", args[0]))
    with torch.no_grad():
        model(ids)
        streams = captured["streams"]  # [s, b, n, d]: the main model's last streams
        hidden, _, _ = model.mtp[0](streams=streams, input_ids=ids, embedding=model.embedding)
        ours = model.output_layer(hidden)[0].transpose(0, 1)  # [b, s, V]

        def rms(x, weight):
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + cfg.rms_norm_eps) * weight

        shifted = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # token t+1 (pad 0 at the end)
        e_part = rms(embed[shifted.t()], t["mtp.0.enorm.weight"]) @ t["mtp.0.e_proj.weight"].t()  # [s, b, d]
        h_part = rms(streams, t["mtp.0.hnorm.weight"]) @ t["mtp.0.h_proj.weight"].t()  # [s, b, n, d]
        x = model.mtp[0].block(e_part.unsqueeze(-2) + h_part, token_ids=shifted.t(), position_ids=None, cp=None,
                               documents=None)
        flat = x.flatten(-2)
        mix = flat @ t["mtp.0.hc_head_fn"].t() * torch.rsqrt(flat.square().mean(-1, keepdim=True) + cfg.hc_eps)
        weights = torch.sigmoid(mix * t["mtp.0.hc_head_scale"] + t["mtp.0.hc_head_base"]) + cfg.hc_eps
        direct = (rms((weights.unsqueeze(-1) * x).sum(-2), t["mtp.0.norm.weight"]) @ head.t()).transpose(0, 1)
    targets = ids[:, 2:]  # depth 0 predicts token t+2

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-2].reshape(-1, logits.shape[-1]), targets.reshape(-1))

    ours_loss, direct_loss = loss(ours).item(), loss(direct).item()
    assert abs(ours_loss - direct_loss) <= 1e-6 * direct_loss, (ours_loss, direct_loss)


@pytest.mark.slow
def test_fp8_and_fp4_reexport_reproduces_the_release_bytes(release, tmp_path):
    ckpt, out = tmp_path / "ckpt_bf16", tmp_path / "official"
    _ok(convert("import", release["release"], ckpt, "--dtype", "bf16"))
    _ok(convert("export", ckpt, out, "--format", "official", "--dtype", "fp8", "--experts", "fp4",
                "--block", BLOCK, "--max-shard-gb", "0.0005", "--like", release["release"]))
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # several shards
    exported = {}
    for shard in set(index.values()):
        exported.update(load_file(str(out / shard)))
    original = release["tensors"]
    assert sorted(exported) == sorted(original)
    differing = [n for n in original if exported[n].dtype != original[n].dtype
                 or not torch.equal(_bytes(exported[n]), _bytes(original[n]))]
    assert not differing, differing[:5]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [BLOCK, BLOCK]
    # Without --like: the plain quantiser on the same values; ambiguous blocks take the other exponent.
    fresh_dir = tmp_path / "fresh"
    _ok(convert("export", ckpt, fresh_dir, "--format", "official", "--dtype", "fp8", "--experts", "fp4",
                "--block", BLOCK))
    fresh = load_file(str(next(fresh_dir.glob("*.safetensors"))))
    for name in (n for n in original if n.endswith(".scale")):
        steps = (_bytes(fresh[name]).int() - _bytes(original[name]).int()).abs()
        assert int(steps.max()) <= 1, name
        weight = name[:-len("scale")] + "weight"
        decode = decode_fp8 if FP8_NAMES.search("." + weight) or MTP_FP8.search(weight) else None
        if decode is not None:
            assert torch.equal(decode(fresh[weight], fresh[name], BLOCK), decode(original[weight], original[name], BLOCK))
        else:
            assert torch.equal(decode_fp4(fresh[weight], fresh[name]), decode_fp4(original[weight], original[name]))


def test_hf_export_loads_in_transformers_with_the_same_logits(release, imported, tmp_path):
    from transformers import DeepseekV4ForCausalLM

    out = tmp_path / "hf"
    proc = _ok(convert("export", imported, out, "--format", "hf", "--dtype", "fp32"))
    assert "MTP not included" in proc.stdout
    exported = DeepseekV4ForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ids = input_ids(CASE)
    with torch.no_grad():
        difference = (exported(ids).logits - release["hf"](ids).logits).abs().max().item()
    assert difference == 0.0, difference  # the same weights in the same code


def _damage(release, tmp_path, kind):
    src = tmp_path / "src"
    shutil.copytree(release["release"], src)
    if kind == "missing_shard":
        os.remove(src / "model-00002-of-00002.safetensors")
        return src, "model-00002-of-00002.safetensors"
    shard = src / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    if kind == "wrong_shape":
        name = next(n for n in sorted(tensors) if n.endswith("attn_norm.weight"))
        tensors[name] = torch.ones(tensors[name].shape[0] + 1, dtype=tensors[name].dtype)
        needle = name
    elif kind == "bad_scale":
        name = next(n for n in sorted(tensors) if n.endswith("wq_a.scale"))
        tensors[name] = torch.cat([tensors[name], tensors[name]])
        needle = name[:-len("scale")] + "weight"
    save_file(tensors, str(shard))
    if kind == "unknown_quant":
        config = json.loads((src / "config.json").read_text())
        config["quantization_config"]["quant_method"] = "awq"
        (src / "config.json").write_text(json.dumps(config))
        needle = "quant_method='awq'"
    return src, needle


@pytest.mark.parametrize("kind", ["missing_shard", "wrong_shape", "bad_scale", "unknown_quant", "bad_layout",
                                  "out_exists"])
def test_bad_input_is_refused_before_writing(release, tmp_path, kind):
    out = tmp_path / "out"
    extra = []
    if kind == "bad_layout":
        src, needle = release["release"], "parallel.ep"
        extra = ["parallel.ep=3"]  # 8 experts do not split 3 ways
    elif kind == "out_exists":
        src, needle = release["release"], "already exists"
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    else:
        src, needle = _damage(release, tmp_path, kind)
    proc = convert("import", src, out, *extra)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(str(out) + ".partial")
    if kind == "out_exists":
        assert (out / "keep.txt").read_text() == "precious"
    else:
        assert not out.exists()


@pytest.mark.slow
def test_layouts_load_the_import_and_export_it_back_bit_exact(tmp_path):
    """tiny_pretrain's initial weights -> official export S -> import by 2 processes -> a TP2+EP2 run and a
    PP2 run load it (model only) and save it again -> exporting each save gives S's bytes back."""
    base = ["conf=tiny_pretrain", "train.precision=fp32", "train.max_steps=1", "optim.warmup_steps=0",
            "optim.decay_steps=1", "train.global_batch_size=4",
            "train.micro_batch_size=1", "logging.wandb=false", "checkpoint.save_final=false",
            "checkpoint.save_initial=true"]
    _ok(run_cli([*base, f"run.dir={tmp_path / 'ref'}"]))
    source = tmp_path / "official"
    _ok(convert("export", tmp_path / "ref" / "checkpoints" / "step_00000000", source, "--format", "official",
                "--dtype", "fp32"))
    imported = tmp_path / "imported"
    _ok(convert("import", source, imported, "--dtype", "fp32", "parallel.tp=2", "parallel.ep=2", "parallel.etp=1",
                nproc=2))
    original = load_file(str(next(source.glob("*.safetensors"))))
    assert any(n.startswith("mtp.") for n in original)
    for name, layout in {"tp2_ep2": ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"], "pp2": ["parallel.pp=2"]}.items():
        run_dir = tmp_path / name
        _ok(run_cli([*base, *layout, f"run.dir={run_dir}", f"checkpoint.load={imported}",
                     "checkpoint.load_model_only=true"], nproc=2))
        again = tmp_path / f"{name}_export"
        _ok(convert("export", run_dir / "checkpoints" / "step_00000000", again, "--format", "official", "--dtype", "fp32"))
        exported = load_file(str(next(again.glob("*.safetensors"))))
        assert sorted(exported) == sorted(original), name
        differing = [n for n in original if not torch.equal(exported[n], original[n])]
        assert not differing, (name, differing[:5])
