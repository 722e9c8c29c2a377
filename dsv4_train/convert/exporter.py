"""`convert export`: a dsv4-train checkpoint -> safetensors in transformers' or DeepSeek's naming.

* `--format hf`: transformers' `save_pretrained` names and config (loads with
  `DeepseekV4ForCausalLM.from_pretrained`); no MTP, which transformers does not implement.
* `--format official`: the release's names, MTP included; `--dtype fp8` re-quantises the release's
  FP8 linears (128x128 blocks, E8M0 or F32 scales) and `--experts fp4|fp8` the routed experts
  (bridge/release_format.py). `--like SRC` keeps SRC's block scales wherever they still encode the
  weights exactly, so weights unchanged since import come back byte for byte (the dequantised values
  alone leave the scale of some blocks ambiguous: see `_prefer_reference`).
Floating tensors otherwise go out in `--dtype` (bf16 or fp32), except those the release keeps in
fp32 (mHC, sinks, compressor position biases, expert bias), which stay fp32 as saved.

Each process writes whole shards (shard i on rank i mod world); a shard is written tensor by tensor,
so memory holds one model tensor and its re-quantised form.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from dsv4_train.bridge.hf import hf_config_from_model, hf_name, native_sources
from dsv4_train.bridge.release_format import quantize_fp4, quantize_fp8, scale_exponents
from dsv4_train.convert.checkpoint_reader import CheckpointTensors
from dsv4_train.convert.host_memory import current_rss, peak_rss_per_rank, return_freed_memory_to_the_os
from dsv4_train.convert.importer import STORAGE_DTYPES, ConvertError, Progress
from dsv4_train.convert.safetensors_io import plan_shards, write_index, write_shard
from dsv4_train.convert.source import SourceCheckpoint

FP8_LINEARS = re.compile(r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]|"
                         r"e_proj|h_proj)\.weight$")
ROUTED_EXPERT = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")


@dataclass(frozen=True)
class Output:
    """One tensor of the export: which part of which model tensor, and how it is encoded."""

    name: str
    native: str  # DeepSeek's name of the piece
    source: str  # our model tensor
    part: int  # which of its native pieces (row blocks), e.g. w1 / w3 of linear_fc1
    parts: int
    encoding: str  # "fp8" | "fp4" | "plain"
    role: str  # "weight" | "scale"
    dtype: torch.dtype
    shape: Tuple[int, ...]


def _encoding(native: str, *, fmt: str, dtype: str, experts: Optional[str]) -> str:
    if fmt != "official":
        return "plain"
    if ROUTED_EXPERT.search(native) and experts in ("fp4", "fp8"):
        return experts
    if dtype == "fp8" and (FP8_LINEARS.search(native) or ROUTED_EXPERT.search(native)):
        return "fp8"
    return "plain"


def plan_outputs(reader: CheckpointTensors, *, fmt: str, dtype: str, experts: Optional[str], block: int,
                 scale_format: str) -> List[Output]:
    from dsv4_train.model.precision import release_fp32_tensors

    plain_dtype = STORAGE_DTYPES.get(dtype, torch.bfloat16)  # fp8: what the release keeps unquantised is bf16
    release_fp32 = {name for name, _ in release_fp32_tensors(reader.model)}
    outputs = []
    for name in reader.names():
        natives = native_sources(name)
        if fmt == "hf" and name.startswith("mtp."):
            continue  # transformers' model has no MTP
        shape = reader.shapes[name]
        rows = shape[0] // len(natives) if shape else 0
        for part, native in enumerate(natives):
            piece = (rows, *shape[1:]) if len(natives) > 1 else shape
            out_name = hf_name(native) if fmt == "hf" else native
            encoding = _encoding(native, fmt=fmt, dtype=dtype, experts=experts)
            stored = reader.stored_dtype[name]
            if encoding == "fp8":
                scale_shape = (-(-piece[0] // block), -(-piece[1] // block))
                scale_dtype = torch.float8_e8m0fnu if scale_format == "ue8m0" else torch.float32
                outputs.append(Output(out_name, native, name, part, len(natives), "fp8", "weight", torch.float8_e4m3fn, piece))
                outputs.append(Output(out_name[:-len("weight")] + "scale", native, name, part, len(natives), "fp8", "scale",
                                      scale_dtype, scale_shape))
            elif encoding == "fp4":
                outputs.append(Output(out_name, native, name, part, len(natives), "fp4", "weight", torch.int8,
                                      (piece[0], piece[1] // 2)))
                outputs.append(Output(out_name[:-len("weight")] + "scale", native, name, part, len(natives), "fp4", "scale",
                                      torch.float8_e8m0fnu, (piece[0], piece[1] // 32)))
            else:
                if not stored.is_floating_point:
                    keep = torch.int64  # hash tables: the release stores I64
                elif name in release_fp32:
                    keep = torch.float32
                else:
                    keep = plain_dtype
                outputs.append(Output(out_name, native, name, part, len(natives), "plain", "weight", keep, piece))
    return outputs


class _Producer:
    """Produces output tensors in order, keeping only the current model tensor and its encodings."""

    def __init__(self, reader: CheckpointTensors, outputs: List[Output], *, block: int, scale_format: str,
                 like: Optional[SourceCheckpoint] = None):
        self.reader, self.block, self.scale_format, self.like = reader, block, scale_format, like
        self.by_name: Dict[str, Output] = {o.name: o for o in outputs}
        self.current: Optional[str] = None
        self.pieces: List[torch.Tensor] = []
        self.encoded: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]] = {}
        self.done_bytes = self.done_tensors = 0

    def __call__(self, out_name: str) -> torch.Tensor:
        output = self.by_name[out_name]
        if self.current != output.source:
            value = self.reader.read(output.source)
            self.pieces = list(value.chunk(output.parts, dim=0)) if output.parts > 1 else [value]
            self.current, self.encoded = output.source, {}
        piece = self.pieces[output.part]
        if output.encoding == "plain":
            result = piece.to(output.dtype)
        else:
            key = (output.part, output.encoding)
            if key not in self.encoded:
                reference = self._reference(output)
                if output.encoding == "fp8":
                    self.encoded[key] = quantize_fp8(piece, block=self.block, scale_format=self.scale_format,
                                                     reference=reference)
                else:
                    self.encoded[key] = quantize_fp4(piece, reference=reference)
            result = self.encoded[key][0 if output.role == "weight" else 1]
        self.done_tensors += 1
        self.done_bytes += result.numel() * result.element_size()
        return result.contiguous()

    def _reference(self, output: Output):
        """The `--like` checkpoint's scale exponents for this weight, if it has the same format and block."""
        if self.like is None or self.like.kinds.get(output.native) != output.encoding:
            return None
        _, scale = self.like.load_stored(output.native)
        scale_shape = tuple(self.by_name[output.name[:-len("weight")] + "scale"].shape) \
            if output.role == "weight" else tuple(output.shape)
        return scale_exponents(scale) if tuple(scale.shape) == scale_shape else None


def export_checkpoint(ckpt: str, out: str, *, fmt: str = "hf", dtype: str = "bf16", experts: Optional[str] = None,
                      block: int = 128, scale_format: str = "ue8m0", max_shard_bytes: int = 4 << 30,
                      like: Optional[str] = None, progress_every: float = 5.0) -> dict:
    """Collective: export the checkpoint `ckpt` into the directory `out`."""
    from dsv4_train.runtime.distributed import init_model_parallel, init_process_group

    if fmt not in ("hf", "official"):
        raise ConvertError(f"--format {fmt!r}: use 'hf' or 'official'.")
    if dtype not in ("bf16", "fp32", "fp8") or (dtype == "fp8" and fmt != "official"):
        raise ConvertError(f"--dtype {dtype!r}: use bf16 or fp32 (fp8 only with --format official).")
    if experts not in (None, "fp4", "fp8") or (experts and fmt != "official"):
        raise ConvertError(f"--experts {experts!r}: use fp4 or fp8, with --format official.")
    if scale_format not in ("ue8m0", "f32"):
        raise ConvertError(f"--scale-format {scale_format!r}: use ue8m0 or f32.")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConvertError(f"{out} already exists; choose a new output directory (nothing was written).")
    init_process_group(device_request="cpu")
    init_model_parallel()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return_freed_memory_to_the_os()
    rss_before = current_rss()  # the interpreter, torch and Megatron-Core: the floor of any process
    try:
        reader = CheckpointTensors(ckpt)
    except ValueError as error:
        raise ConvertError(str(error)) from None
    outputs = plan_outputs(reader, fmt=fmt, dtype=dtype, experts=experts, block=block, scale_format=scale_format)
    entries = [(o.name, o.dtype, o.shape) for o in outputs]
    shards = plan_shards(entries, max_shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    partial = out.rstrip("/") + ".partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    torch.distributed.barrier()
    producer = _Producer(reader, outputs, block=block, scale_format=scale_format,
                         like=SourceCheckpoint(like) if like else None)
    progress = Progress("convert export", enabled=rank == 0 and progress_every > 0, every=progress_every)
    mine = [i for i in range(len(shards)) if i % world == rank]
    progress.start(sum(dtype_.itemsize * math.prod(shape) for i in mine for _, dtype_, shape in shards[i]))
    try:
        for index in mine:
            def produce(name):
                value = producer(name)
                progress.update(producer.done_tensors, producer.done_bytes)
                return value

            write_shard(os.path.join(partial, names[index]), shards[index], produce)
        torch.distributed.barrier()
        if rank == 0:
            write_index(partial, zip(names, shards))
            config = hf_config_from_model(reader.model_cfg)
            if fmt == "official" and (dtype == "fp8" or experts):
                config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": scale_format,
                                                 "activation_scheme": "dynamic", "weight_block_size": [block, block]}
                if experts:
                    config["expert_dtype"] = experts
            config["torch_dtype"] = "bfloat16" if dtype != "fp32" else "float32"
            with open(os.path.join(partial, "config.json"), "w") as handle:
                json.dump(config, handle, indent=2)
            if os.path.isdir(out):
                os.rmdir(out)
            os.replace(partial, out)
        torch.distributed.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    progress.finish()
    return {"tensors": len(outputs), "shards": len(shards), "rank_bytes": producer.done_bytes,
            "seconds": progress.elapsed, "mtp": any(o.source.startswith("mtp.") for o in outputs),
            "peak_rss": peak_rss_per_rank(), "rss_before": rss_before}

