"""Per-step hardware and MoE telemetry for the step line, `metrics.jsonl` and wandb.

* `model_tflops`: model FLOPs per second per process, in TFLOP/s:
  `plan.flops.flops_per_token(seq_length)["total"] x tokens of the step / step time / world size`.
  The FLOPs are the plan's V4 formula (Megatron-Bridge conventions: 6 FLOPs per weight per token,
  core attention over window + visible compressed entries, MTP included), so the figure is
  comparable with their published TFLOP/s/GPU rows. Recompute is not counted in it (the MFU
  convention); `hardware_tflops` adds the recomputed forward (full recompute: one more forward of
  every block, i.e. a third of the blocks' training FLOPs).
* `mfu`: model_tflops / the device's dense bf16 peak (a table of common GPUs, or `run.peak_tflops`);
  absent on CPU unless `run.peak_tflops` is set.
* `moe_load_imbalance`: max / mean tokens per expert of the step, worst MoE layer (hash and scored
  layers alike; the counts of every rank holding the layer summed first).
* `expert_bias_absmax`: the largest |noaux_tc expert bias| of any scored layer.
* `max_memory_gib`: the largest over ranks of `torch.cuda.max_memory_allocated` on GPU, or of the
  process's peak RSS on CPU.
"""

from __future__ import annotations

import os
import resource
from typing import Dict, List, Optional

import torch

from dsv4_train.plan.flops import flops_per_token

GIB = 1024**3
# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from the vendors' data sheets. Matched
# against torch.cuda.get_device_name() by substring, longest name first (e.g. "GB200" before "B200").
PEAK_BF16_TFLOPS = {
    "GB200": 2500.0, "B200": 2250.0, "H200": 989.4, "H100": 989.4, "H800": 989.4, "H20": 148.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.05, "L40": 181.05, "L4": 121.0, "A10": 125.0,
}


def device_peak_tflops(override: Optional[float], device: torch.device) -> Optional[float]:
    """`run.peak_tflops` if set, else the table's entry for this CUDA device; None when unknown."""
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def _routers(model_chunks) -> list:
    return [m for chunk in model_chunks for m in chunk.modules() if hasattr(m, "take_step_counts")]


class StepTelemetry:
    """Reads the step's counters after each training step. Collective: every rank calls `measure`."""

    def __init__(self, *, cfg, model_chunks: List[torch.nn.Module], device: torch.device, world_size: int):
        self.model_cfg, self.tp, self.recompute = cfg.model, cfg.parallel.tp, cfg.train.recompute
        self.model_chunks = model_chunks
        self.device = device
        self.world_size = world_size
        self.peak_tflops = device_peak_tflops(getattr(cfg.run, "peak_tflops", None), device)
        self._flops: Dict[int, dict] = {}  # seq_length -> the plan's FLOPs per token

    def measure(self, *, seq_length: int, tokens: int, step_time: float) -> dict:
        """The step's telemetry; `tokens` = global batch x sequence length of the step."""
        if seq_length not in self._flops:
            self._flops[seq_length] = flops_per_token(self.model_cfg, seq_length=seq_length, tp=self.tp)
        flops = self._flops[seq_length]
        model = flops["total"] * tokens / max(step_time, 1e-9) / self.world_size / 1e12
        recomputed = 0.0
        if self.recompute == "full":
            blocks = flops["total"] - flops["logits"] - flops["mtp_projection"]
            recomputed = blocks / 3 * tokens / max(step_time, 1e-9) / self.world_size / 1e12
        out = {"model_tflops": model, "hardware_tflops": model + recomputed}
        if self.peak_tflops:
            out["mfu"] = model / self.peak_tflops
        out.update(self._moe_and_memory())
        return out

    def _moe_and_memory(self) -> dict:
        from megatron.core import parallel_state

        routers = _routers(self.model_chunks)
        worst_imbalance = 0.0
        if routers:
            counts = [r.take_step_counts() for r in routers]  # None: no training forward (a skipped batch)
            stacked = torch.zeros(len(routers), self.model_cfg.num_routed_experts, dtype=torch.float64,
                                  device=self.device)
            for row, c in enumerate(counts):
                if c is not None:
                    stacked[row, : c.numel()] = c.to(self.device)
            if torch.distributed.is_initialized():
                # Every rank of this pipeline stage holds the same layers: sum their tokens.
                group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
                torch.distributed.all_reduce(stacked, group=group)
            mean = stacked.mean(dim=1)
            ratio = torch.where(mean > 0, stacked.max(dim=1).values / mean.clamp(min=1e-30), torch.zeros_like(mean))
            worst_imbalance = float(ratio.max()) if ratio.numel() else 0.0
        biases = [r.expert_bias for r in routers if getattr(r, "expert_bias", None) is not None]
        bias_absmax = max((float(b.detach().abs().max()) for b in biases), default=0.0)
        if self.device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(self.device) / GIB
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux
        values = torch.tensor([worst_imbalance, bias_absmax, memory], dtype=torch.float64, device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        imbalance, bias_absmax, memory = values.tolist()
        return {"max_memory_gib": memory, "moe_load_imbalance": imbalance, "expert_bias_absmax": bias_absmax}


class StepProfiler:
    """`train.profile_steps=[first, last]`: a torch profiler trace of those steps (inclusive), written
    as `<run.dir>/profile/rank_<r>_steps_<first>-<last>.json` (Chrome trace format: chrome://tracing,
    Perfetto, or TensorBoard's profiler plugin)."""

    def __init__(self, steps, *, run_dir: str, rank: int, device: torch.device):
        self.first, self.last = (int(steps[0]), int(steps[1])) if steps else (0, -1)
        self.path = f"{run_dir}/profile/rank_{rank}_steps_{self.first}-{self.last}.json"
        self.device = device
        self._profiler = None

    def before_step(self, step: int) -> None:
        if step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()

    def after_step(self, step: int) -> Optional[str]:
        """The trace's path once written (after the last profiled step), else None."""
        if self._profiler is not None and step >= self.last:
            self._profiler.__exit__(None, None, None)
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._profiler.export_chrome_trace(self.path)
            self._profiler = None
            return self.path
        return None

    def close(self) -> None:
        """A run that ends (or stops) inside the profiled range still writes what it traced."""
        if self._profiler is not None:
            self.after_step(self.last)
