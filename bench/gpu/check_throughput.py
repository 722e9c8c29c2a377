"""GPU throughput check (one prepared run on one GPU, < 10 minutes): what a step costs on real hardware.

    bash bench/gpu/check_throughput.sh                     # on the GPU machine (installs the carried wheels)
    python bench/gpu/check_throughput.py --device cpu --smoke   # the same code path on CPU, tiny sizes

1. The bf16 matmul ceiling of the device (8192^3 GEMMs): the practical peak MFU is measured against.
2. mHC's Sinkhorn at 4K tokens, eager step loops vs the compiled kernels `model.sinkhorn_kernel=auto`
   runs on CUDA: exactness (forward and gradient) and time per forward + backward. If compiling
   fails, the error is reported and the runs below use `model.sinkhorn_kernel=eager`.
3. `tiny_pretrain` in bf16 on the GPU (30 steps): loss falls, tokens/s, telemetry present.
4. A single-GPU V4 proxy with Flash's widths (hidden 4096, 64 heads of 512, q/o low rank, mHC 4,
   CSA + HCA + SWA layers, 8 experts of 2048, top-6, vocab 129280), 4 layers + MTP, 4K tokens,
   synthetic data, bf16: tokens/s, model TFLOP/s (the plan's FLOPs), MFU against the table peak and
   against the measured ceiling, peak memory against the plan's estimate for the same config.
5. The same proxy with `model.compile=true` (each V4 block as torch.compile graphs): the same
   figures, steady state after compilation, so the two rows give the compiled blocks' speed-up.
One JSON line per measurement on stdout and in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the Sinkhorn check imports the package from this checkout

FLASH_PROXY = [
    "model=flash", "model.num_layers=4", "model.compress_ratios=[0,4,128,4,0]", "model.num_hash_layers=1",
    "model.num_routed_experts=8", "parallel=single", "data=mock", "data.document_mask=false",
    "train.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=4", "train.precision=bf16",
    "train.recompute=none", "optim.warmup_steps=2", "logging=console", "checkpoint.save_final=false",
]


def emit(out, record: dict) -> None:
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    out.write(line + "\n")
    out.flush()


def matmul_ceiling(device: str, size: int, iters: int = 20) -> float:
    import torch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * iters / (time.perf_counter() - t0) / 1e12


def sinkhorn_kernels(device: str, tokens: int) -> dict:
    """Eager vs compiled Sinkhorn step loops (model/sinkhorn.py) on `device`: max differences and ms per
    forward + backward of one mHC's [tokens, 4, 4] projection (20 iterations, fp32, as in the model)."""
    import torch

    if device == "cpu":
        from dsv4_train.mcore import cpu_compat

        cpu_compat.apply()  # Megatron-Core imports need the CPU layer without a GPU
    from dsv4_train.model.sinkhorn import sinkhorn_comb

    gen = torch.Generator().manual_seed(0)
    logits = (4.0 * torch.randn(tokens, 4, 4, generator=gen)).to(device)
    upstream = torch.randn(tokens, 4, 4, generator=gen).to(device)

    def step(compiled: bool):
        x = logits.clone().requires_grad_()
        y = sinkhorn_comb(x, iters=20, eps=1e-6, compiled=compiled)
        (y * upstream).sum().backward()
        return y.detach(), x.grad

    def synchronize():
        if device != "cpu":
            torch.cuda.synchronize()

    record = {"check": "sinkhorn_kernels", "tokens": tokens}
    start = time.perf_counter()
    compiled_out, compiled_grad = step(True)
    synchronize()
    record["compile_s"] = time.perf_counter() - start
    eager_out, eager_grad = step(False)
    record["forward_max_diff"] = (compiled_out - eager_out).abs().max().item()
    record["grad_max_diff"] = (compiled_grad - eager_grad).abs().max().item()
    for name, compiled in (("eager", False), ("compiled", True)):
        for _ in range(3):
            step(compiled)
        synchronize()
        start = time.perf_counter()
        for _ in range(20):
            step(compiled)
        synchronize()
        record[f"{name}_ms"] = (time.perf_counter() - start) / 20 * 1e3
    return record


def cli(args, run_dir: str, timeout: int) -> dict:
    """Run the trainer; returns its metrics rows and exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dsv4_train", *args, f"run.dir={run_dir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    rows = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        rows = [json.loads(line) for line in open(path) if line.strip()]
    return {"rc": proc.returncode, "rows": rows, "wall_s": time.monotonic() - t0,
            "tail": (proc.stdout + proc.stderr)[-1500:] if proc.returncode else ""}


def steady(rows, key: str, skip: int):
    """Mean of `key` over the steps after the first `skip` (compilation and warm-up excluded)."""
    values = [r[key] for r in rows[skip:] if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU check of this script)")
    parser.add_argument("--out", default="gpu_throughput.jsonl")
    args = parser.parse_args()
    work = os.path.join(os.path.dirname(os.path.abspath(args.out)), "throughput_runs")
    os.makedirs(work, exist_ok=True)
    device_flag = f"run.device={args.device}"
    with open(args.out, "w") as out:
        ceiling = matmul_ceiling(args.device, 512 if args.smoke else 8192)
        emit(out, {"check": "matmul_ceiling_tflops", "value": ceiling, "device": args.device})

        sinkhorn_override = []
        if os.environ.get("TORCHDYNAMO_DISABLE") != "1":  # the compiled loops need torch.compile
            try:
                emit(out, sinkhorn_kernels(args.device, 128 if args.smoke else 4096))
            except Exception as error:  # noqa: BLE001 (a one-shot device run: report and go on)
                emit(out, {"check": "sinkhorn_kernels", "error": f"{type(error).__name__}: {error}"[-2000:]})
                sinkhorn_override = ["model.sinkhorn_kernel=eager"]  # keep the proxy measurable
        steps = 3 if args.smoke else 30
        precision = "fp32" if args.smoke else "bf16"
        tiny = cli([device_flag, f"train.max_steps={steps}", "optim.warmup_steps=1", f"train.precision={precision}",
                    *sinkhorn_override],
                   os.path.join(work, "tiny"), timeout=600)
        rows = tiny["rows"]
        emit(out, {"check": "tiny_pretrain", "rc": tiny["rc"], "steps": len(rows), "precision": precision,
                   "first_loss": rows[0]["lm_loss"] if rows else None, "last_loss": rows[-1]["lm_loss"] if rows else None,
                   "tokens_per_sec": steady(rows, "tokens_per_sec", 2), "telemetry": bool(rows) and "model_tflops" in rows[-1],
                   "wall_s": tiny["wall_s"], "tail": tiny["tail"]})
        if args.smoke:
            return 0 if tiny["rc"] == 0 else 1

        plan_dir = os.path.join(work, "flash_proxy_plan")
        cli(["run.plan_only=true", "parallel.world_size=1", *FLASH_PROXY], plan_dir, timeout=120)
        plan = json.load(open(os.path.join(plan_dir, "plan.json"))) if os.path.exists(os.path.join(plan_dir, "plan.json")) else {}
        emit(out, flash_proxy("flash_proxy", [device_flag, *sinkhorn_override], os.path.join(work, "flash_proxy"),
                              ceiling, plan))
        if os.environ.get("TORCHDYNAMO_DISABLE") != "1":
            emit(out, flash_proxy("flash_proxy_compiled", [device_flag, "model.compile=true"],
                                  os.path.join(work, "flash_proxy_compiled"), ceiling, plan))
    return 0


def flash_proxy(check: str, overrides, run_dir: str, ceiling: float, plan: dict) -> dict:
    """12 steps of the Flash-width proxy; figures averaged after 4 (warm-up, compilation)."""
    proxy = cli(["train.max_steps=12", *FLASH_PROXY, *overrides], run_dir, timeout=900)
    rows = proxy["rows"]
    tflops = steady(rows, "model_tflops", 4)
    return {
        "check": check, "rc": proxy["rc"], "steps": len(rows), "overrides": overrides,
        "tokens_per_sec": steady(rows, "tokens_per_sec", 4), "model_tflops": tflops,
        "mfu_table_peak": steady(rows, "mfu", 4),
        "mfu_measured_ceiling": tflops / ceiling if tflops else None,
        "max_memory_gib": rows[-1].get("max_memory_gib") if rows else None,
        "plan_memory_gib_none": plan.get("memory_per_rank", {}).get("none", [{}])[0].get("total_gib"),
        "first_loss": rows[0]["lm_loss"] if rows else None, "last_loss": rows[-1]["lm_loss"] if rows else None,
        "wall_s": proxy["wall_s"], "tail": proxy["tail"],
    }


if __name__ == "__main__":
    sys.exit(main())
