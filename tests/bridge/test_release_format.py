"""DeepSeek's release weight format (bridge/release_format.py): FP8 block-scaled linears and packed
MXFP4 routed experts are dequantised exactly.

* Known-answer vectors of the format reference: E8M0 bytes, one packed MXFP4 row.
* A tiny V4 written in the release format by a quantiser written here (FP8 with power-of-two E8M0
  block scales over 48 x 48 blocks, so 64-wide weights end in partial tiles; FP4 experts with
  per-32 E8M0 scales; native names; quantization_config): `load_hf` gives logits equal to
  transformers' `DeepseekV4ForCausalLM.from_pretrained` on the dequantised weights within 1e-5 (the
  same tolerance as the unquantised parity test: only the order of float sums differs), and the
  import report lists what was dequantised.
* Malformed quantised tensors are refused naming the tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_oracle import CASES, build_hf, input_ids, save_hf

CASE = CASES[0]
BLOCK = 48
FP8_NAMES = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123])\.weight$")
FP4_NAMES = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _e8m0(exponents: torch.Tensor) -> torch.Tensor:
    return (exponents + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def quantize_fp8(w: torch.Tensor, block: int):
    """Per block: S = 2^ceil(log2(amax / 448)), Q = e4m3(W / S) (round to nearest even)."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    exps = torch.zeros(rows, cols, dtype=torch.int32)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            e = math.ceil(math.log2(max(tile.abs().max().item(), 1e-4) / 448.0))
            exps[i, j] = e
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / 2.0 ** e).to(torch.float8_e4m3fn)
    return q, _e8m0(exps)


def quantize_fp4(w: torch.Tensor):
    """Per 1 x 32 group: S = 2^ceil(log2(amax / 6)), codes = nearest E2M1 value (ties to even code)."""
    out_dim, in_dim = w.shape
    groups = w.reshape(out_dim, in_dim // 32, 32)
    amax = groups.abs().amax(-1).clamp(min=6 * 2.0 ** -126)
    exps = torch.ceil(torch.log2(amax / 6.0)).to(torch.int32)
    scaled = groups / torch.exp2(exps.float()).unsqueeze(-1)
    grid = torch.tensor(E2M1_GRID)
    distance = (scaled.abs().unsqueeze(-1) - grid).abs()
    code = torch.argmin(distance + 1e-6 * (torch.arange(8) % 2), dim=-1)  # ties -> even code
    code = code + 8 * ((scaled < 0) & (code > 0))
    code = code.reshape(out_dim, in_dim).to(torch.uint8)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8)
    return packed, _e8m0(exps)


def decode_fp8(q, s, block):
    factors = torch.exp2(s.view(torch.uint8).float() - 127)
    factors = factors.repeat_interleave(block, 0)[:q.shape[0]].repeat_interleave(block, 1)[:, :q.shape[1]]
    return q.float() * factors


def decode_fp4(packed, s):
    codes = packed.view(torch.uint8)
    grid = torch.tensor(E2M1_GRID + [-v for v in E2M1_GRID])
    values = torch.stack((grid[(codes & 15).long()], grid[(codes >> 4).long()]), -1).reshape(codes.shape[0], -1)
    return values * torch.exp2(s.view(torch.uint8).float() - 127).repeat_interleave(32, 1)


def test_known_answer_vectors():
    from dsv4_train.bridge.release_format import decode_e8m0, dequantize_fp4

    decoded = decode_e8m0(torch.tensor([0, 1, 126, 127, 128, 254, 255], dtype=torch.uint8))
    assert decoded[:6].tolist() == [2.0 ** -127, 2.0 ** -126, 0.5, 1.0, 2.0, 2.0 ** 127] and math.isnan(decoded[6])
    row = [0xA1] + [0x00] * 14 + [0x57]
    packed = torch.tensor([row], dtype=torch.uint8).view(torch.int8)
    values = dequantize_fp4(packed, torch.tensor([[127]], dtype=torch.uint8).view(torch.float8_e8m0fnu), name="t")
    assert values[0].tolist() == [0.5, -1.0] + [0.0] * 28 + [6.0, 3.0]


@pytest.fixture(scope="module")
def release(megatron_world1, tmp_path_factory):
    """(release-format dir, dequantised transformers model)."""
    from transformers import DeepseekV4ForCausalLM

    root = tmp_path_factory.mktemp("release")
    plain = save_hf(build_hf(CASE), str(root / "plain"))
    tensors = load_file(os.path.join(plain, "model.safetensors"))
    quantized, dequantized = {}, dict(tensors)
    for name, w in tensors.items():
        native = name[len("model."):] if name.startswith("model.") else name
        if FP8_NAMES.search(name):
            q, s = quantize_fp8(w, BLOCK)
            quantized[native], quantized[native[:-len("weight")] + "scale"] = q, s
            dequantized[name] = decode_fp8(q, s, BLOCK)
        elif FP4_NAMES.search(name):
            q, s = quantize_fp4(w)
            quantized[native], quantized[native[:-len("weight")] + "scale"] = q, s
            dequantized[name] = decode_fp4(q, s)
        else:
            quantized[name] = w
    counts = {"fp8": sum(1 for n in tensors if FP8_NAMES.search(n)), "fp4": sum(1 for n in tensors if FP4_NAMES.search(n))}
    assert counts["fp8"] > 10 and counts["fp4"] > 10
    (root / "release").mkdir()
    save_file(quantized, str(root / "release" / "model.safetensors"))
    config = json.loads((root / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                     "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    (root / "release" / "config.json").write_text(json.dumps(config))
    (root / "dequantized").mkdir()
    shutil.copy(root / "plain" / "config.json", root / "dequantized" / "config.json")
    save_file({k: v.contiguous() for k, v in dequantized.items()}, str(root / "dequantized" / "model.safetensors"))
    hf = DeepseekV4ForCausalLM.from_pretrained(str(root / "dequantized"), torch_dtype=torch.float32).eval()
    return str(root / "release"), hf, counts


def test_release_format_imports_exactly(release):
    from dsv4_train.bridge import load_hf

    directory, hf, counts = release
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = load_hf(directory)
    report = ours.hf_import_report
    assert len(report["dequantized_fp8"]) == counts["fp8"] and len(report["dequantized_fp4"]) == counts["fp4"]
    ids = input_ids(CASE)
    with torch.no_grad():
        difference = (ours(ids) - hf(ids).logits).abs().max().item()
    assert difference <= 1e-5, difference


@pytest.mark.parametrize("damage,expected", [
    ("drop_scale", "is quantised (torch.float8_e4m3fn) but has no .scale tensor"),
    ("bad_scale_shape", "needs a scale of shape"),
    ("fp4_as_float", "has a block scale but dtype torch.float32"),
])
def test_malformed_quantised_tensors_are_refused(release, tmp_path, damage, expected):
    from dsv4_train.bridge import load_hf

    directory, _, _ = release
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    fp8 = next(n for n in sorted(tensors) if n.endswith("attn.wq_a.weight"))
    fp4 = next(n for n in sorted(tensors) if FP4_NAMES.search("." + n))
    if damage == "drop_scale":
        del tensors[fp8[:-len("weight")] + "scale"]
    elif damage == "bad_scale_shape":
        key = fp8[:-len("weight")] + "scale"
        tensors[key] = torch.cat([tensors[key], tensors[key]], 0)
    else:
        tensors[fp4] = torch.zeros(tensors[fp4].shape[0], tensors[fp4].shape[1] * 2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(directory, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_hf(str(tmp_path))
