"""`convert verify`: every tensor of a converted checkpoint against its (dequantised) source.

A tensor passes when it equals the source value rounded to the checkpoint's storage dtype, bit for
bit; the report gives the worst absolute and relative difference per tensor class (layer and expert
indices folded), and names what could not be compared (e.g. MTP absent from the source).
"""

from __future__ import annotations

import re
from typing import Dict, List

import torch

from dsv4_train.convert.checkpoint_reader import CheckpointTensors
from dsv4_train.convert.source import SourceCheckpoint


def tensor_class(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def verify(src: str, ckpt: str) -> dict:
    """{"classes": {class: {"tensors", "max_abs", "max_rel", "mismatched"}}, "unchecked": [...], "ok": bool}."""
    from dsv4_train.runtime.distributed import init_model_parallel, init_process_group

    init_process_group(device_request="cpu")
    init_model_parallel()
    source = SourceCheckpoint(src)
    reader = CheckpointTensors(ckpt)
    classes: Dict[str, dict] = {}
    unchecked: List[str] = []
    for name in reader.names():
        sources = source.sources_of(name)
        if not sources or any(s not in source.tensors for s in sources):
            unchecked.append(name)
            continue
        stored = reader.read(name)
        expected = source.assemble(sources)
        if tuple(expected.shape) != tuple(stored.shape):
            raise ValueError(f"{name}: source {list(expected.shape)} vs checkpoint {list(stored.shape)}.")
        entry = classes.setdefault(tensor_class(name), {"tensors": 0, "max_abs": 0.0, "max_rel": 0.0, "mismatched": []})
        entry["tensors"] += 1
        difference = (stored.double() - expected.double()).abs()
        scale = expected.double().abs().max().item() if expected.numel() else 0.0
        worst = difference.max().item() if difference.numel() else 0.0
        entry["max_abs"] = max(entry["max_abs"], worst)
        entry["max_rel"] = max(entry["max_rel"], worst / scale if scale else 0.0)
        if not torch.equal(expected.to(stored.dtype), stored):
            entry["mismatched"].append(name)
    unused = sorted(set(source.tensors) - {s for n in reader.names() for s in (source.sources_of(n) or [])})
    ok = not any(entry["mismatched"] for entry in classes.values())
    return {"classes": classes, "unchecked": unchecked, "unused_source": unused, "ok": ok}


def format_report(report: dict) -> str:
    lines = [f"{'tensor class':64s} {'n':>5s} {'max abs':>10s} {'max rel':>10s}  status"]
    for name, entry in sorted(report["classes"].items()):
        status = "exact" if not entry["mismatched"] else f"DIFFERS ({len(entry['mismatched'])})"
        lines.append(f"{name:64s} {entry['tensors']:5d} {entry['max_abs']:10.3g} {entry['max_rel']:10.3g}  {status}")
    if report["unchecked"]:
        lines.append(f"not in the source (kept as initialised): {len(report['unchecked'])}, e.g. {report['unchecked'][:3]}")
    if report["unused_source"]:
        lines.append(f"source tensors the checkpoint does not hold: {len(report['unused_source'])}, "
                     f"e.g. {report['unused_source'][:3]}")
    lines.append("verify: OK (every tensor equals its source at the storage precision)" if report["ok"]
                 else "verify: FAILED")
    return "\n".join(lines)
