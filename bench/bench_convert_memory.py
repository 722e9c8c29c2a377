"""Peak host memory and throughput of `convert import` against the checkpoint size and process count.

    OMP_NUM_THREADS=1 python bench/bench_convert_memory.py [--sizes-gb 2,4] [--procs 1,2] [--workdir DIR]
        [--export] [--keep-sources]

For each size a synthetic checkpoint in DeepSeek's release format is written (streamed, one tensor at
a time): a V4 of Flash's structure at reduced width (hidden 2048, 32 experts of 1024, vocab 32768)
with as many layers as the size needs; FP8 e4m3 linears with E8M0 128x128 scales and FP8 routed
experts (V4-Flash-Base's format), bf16 / fp32 / int64 elsewhere as the release stores them; random
codes (never NaN), since only bytes and shapes matter here. Each conversion (`--dtype bf16`) runs as
the CLI does, under torchrun for several processes; the CLI's report gives each rank's peak RSS, the
RSS it held before converting (interpreter + torch + Megatron-Core) and the largest model tensor
(peaks are each process's own VmHWM: see dsv4_train/convert/host_memory.py). `--export` also
exports the 1-process checkpoint (`--format hf --dtype bf16`) and reports that process's peak.
Prints one row per (size, processes): model size, peak RSS per process, the increment over the
floor, and GB/s of source read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

FP8_LINEARS = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.(shared_)?experts(\.\d+)?\.w[123]|"
                         r"e_proj|h_proj)\.weight$")
RELEASE_FP32 = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")
BLOCK = 128


def model_config(num_layers: int):
    from dsv4_train.config.model import ModelConfig, YarnConfig

    ratios = [0, 4] + [128, 4] * ((num_layers - 2) // 2) + [4] * ((num_layers - 2) % 2)
    return ModelConfig(name="bench", vocab_size=32768, hidden_size=2048, num_layers=num_layers, num_attention_heads=16,
                       head_dim=128, qk_rope_head_dim=64, q_lora_rank=512, o_groups=4, o_lora_rank=512,
                       sliding_window=128, compress_ratios=ratios + [0], index_n_heads=8, index_head_dim=128,
                       index_topk=64, num_hash_layers=1, num_routed_experts=32, num_shared_experts=1,
                       num_experts_per_tok=4, moe_intermediate_size=1024, mtp_num_layers=1,
                       yarn=YarnConfig(factor=4.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0))


def native_tensors(model_cfg):
    """[(native name, shape, kind)] of the model in release form, in model order."""
    from dsv4_train.bridge.hf import native_sources
    from dsv4_train.convert.importer import build_meta_model, model_tensors

    model = build_meta_model(model_cfg, dtype="bf16")
    out = []
    for name, tensor in model_tensors(model).items():
        sources = native_sources(name)
        rows = tensor.shape[0] // len(sources)
        for native in sources:
            shape = (rows, *tensor.shape[1:]) if len(sources) > 1 else tuple(tensor.shape)
            if native.endswith("tid2eid"):
                kind = "int64"
            elif FP8_LINEARS.search(native):
                kind = "fp8"
            elif RELEASE_FP32.search(native):
                kind = "fp32"
            else:
                kind = "bf16"
            out.append((native, shape, kind))
    return out


def release_bytes(tensors) -> int:
    total = 0
    for _, shape, kind in tensors:
        numel = 1
        for dim in shape:
            numel *= dim
        total += numel * {"fp8": 1, "bf16": 2, "fp32": 4, "int64": 8}[kind]
        if kind == "fp8":
            total += -(-shape[0] // BLOCK) * -(-shape[1] // BLOCK)
    return total


def write_release(directory: str, model_cfg, tensors, seed: int = 0) -> None:
    from dsv4_train.bridge.hf import hf_config_from_model
    from dsv4_train.convert.safetensors_io import plan_shards, write_index, write_shard

    os.makedirs(directory)
    generator = torch.Generator().manual_seed(seed)
    entries, makers = [], {}
    for native, shape, kind in tensors:
        if kind == "fp8":
            scale_shape = (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
            entries += [(native, torch.float8_e4m3fn, shape), (native[:-len("weight")] + "scale", torch.float8_e8m0fnu,
                                                                scale_shape)]

            def codes(shape=shape):
                raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
                raw[(raw & 0x7F) == 0x7F] = 0  # e4m3fn's NaN codes
                return raw.view(torch.float8_e4m3fn)

            makers[native] = codes
            makers[native[:-len("weight")] + "scale"] = lambda s=scale_shape: torch.randint(
                117, 124, s, dtype=torch.uint8, generator=generator).view(torch.float8_e8m0fnu)
        elif kind == "int64":
            entries.append((native, torch.int64, shape))
            makers[native] = lambda s=shape: torch.rand(s[0], model_cfg.num_routed_experts,
                                                        generator=generator).argsort(-1)[:, :s[1]].to(torch.int64)
        else:
            dtype = torch.float32 if kind == "fp32" else torch.bfloat16
            entries.append((native, dtype, shape))
            makers[native] = lambda s=shape, d=dtype: (torch.randn(s, generator=generator) * 0.02).to(d)
    shards = plan_shards(entries, 1 << 30)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_shard(os.path.join(directory, name), shard, lambda n: makers[n]())
    write_index(directory, zip(names, shards))
    config = hf_config_from_model(model_cfg)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                     "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]}
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(config, handle)


def convert(src: str, out: str, procs: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore")
    module = ["-m", "dsv4_train.convert", "import", src, out, "--dtype", "bf16", "--progress-every", "0"]
    command = [sys.executable, *module] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_port=29731", *module]
    started = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.monotonic() - started
    if proc.returncode:
        raise SystemExit(f"convert failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("imported"))
    peaks = [int(x) for x in re.search(r"peak RSS per rank \[([^\]]*)\]", line)[1].split(",")]
    floor = int(re.search(r"held (\d+) MiB before", line)[1])
    largest = int(re.search(r"largest tensor (\d+) MiB", line)[1])
    seconds = float(re.search(r"in ([\d.]+) s;", line)[1])
    return {"peaks_mib": peaks, "floor_mib": floor, "largest_mib": largest, "convert_s": seconds, "wall_s": wall}


def export_peak(ckpt: str, out: str) -> dict:
    """`convert export --format hf --dtype bf16` of a converted checkpoint, one process: its peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "dsv4_train.convert", "export", ckpt, out, "--format", "hf", "--dtype", "bf16",
               "--progress-every", "0"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"export failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("exported"))
    return {"export_peak_mib": int(re.search(r"peak RSS per rank \[(\d+)", line)[1]),
            "export_floor_mib": int(re.search(r"held (\d+) MiB before", line)[1]),
            "export_s": float(re.search(r"([\d.]+) s;", line)[1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes-gb", default="2,4")
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--workdir", default="/tmp/dsv4_convert_bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--export", action="store_true", help="also export each 1-process checkpoint (hf, bf16)")
    parser.add_argument("--keep-sources", action="store_true",
                        help="keep each synthetic release in WORKDIR and reuse one already there (written by this script)")
    args = parser.parse_args()
    from dsv4_train.runtime.distributed import init_single_process_for_tools

    init_single_process_for_tools(seed=0)
    rows = []
    for size in [float(s) for s in args.sizes_gb.split(",")]:
        layers = 4
        while release_bytes(native_tensors(model_config(layers))) < size * 1e9:
            layers += 2
        model_cfg = model_config(layers)
        tensors = native_tensors(model_cfg)
        model_bytes = release_bytes(tensors)
        src = os.path.join(args.workdir, f"release_{size:g}gb")
        if not (args.keep_sources and os.path.isfile(os.path.join(src, "config.json"))):
            shutil.rmtree(src, ignore_errors=True)
            started = time.monotonic()
            write_release(src, model_cfg, tensors)
            print(f"wrote {src}: {layers} layers, {model_bytes / 1e9:.2f} GB in {time.monotonic() - started:.0f} s",
                  flush=True)
        for procs in [int(p) for p in args.procs.split(",")]:
            out = os.path.join(args.workdir, f"ckpt_{size:g}gb_{procs}p")
            shutil.rmtree(out, ignore_errors=True)
            result = convert(src, out, procs)
            if args.export and procs == 1:
                exported = out + "_export"
                shutil.rmtree(exported, ignore_errors=True)
                export = export_peak(out, exported)
                shutil.rmtree(exported, ignore_errors=True)
                print(json.dumps({"export_of_gb": model_bytes / 1e9, **export}), flush=True)
            shutil.rmtree(out, ignore_errors=True)
            row = {"model_gb": model_bytes / 1e9, "layers": layers, "procs": procs, **result,
                   "gb_per_s": model_bytes / 1e9 / result["convert_s"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not args.keep_sources:
            shutil.rmtree(src, ignore_errors=True)
    print(f"\n{'model GB':>9} {'procs':>5} {'peak RSS MiB/proc':>20} {'floor MiB':>9} {'peak-floor':>10} "
          f"{'peak/model':>10} {'largest MiB':>11} {'GB/s':>6}")
    for r in rows:
        worst = max(r["peaks_mib"])
        print(f"{r['model_gb']:9.2f} {r['procs']:5d} {str(r['peaks_mib']):>20} {r['floor_mib']:9d} "
              f"{worst - r['floor_mib']:10d} {worst * 2**20 / (r['model_gb'] * 1e9):10.1%} {r['largest_mib']:11d} "
              f"{r['gb_per_s']:6.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
