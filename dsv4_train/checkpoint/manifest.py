"""A checkpoint's manifest: every file with its size and CRC32, checked before anything is loaded.

The manifest is part of `dsv4_complete.json`, the marker written last (checkpoint/io.py), so a
checkpoint without it is incomplete by construction. Each rank checksums the files it wrote (its
`__<rank>_*.distcp` and `rng/rank_<rank>.pt`; rank 0 also the shared metadata) and rank 0 gathers
them. Verification (`checkpoint.verify`): `full` checks sizes and checksums, `size` only sizes, `off`
nothing; files are split over the ranks and the verdict is agreed by all. A file on disk that the
manifest does not list is refused too (nothing unexpected is ever read). The marker itself carries a
CRC32 of its own content (`seal`), so a changed step, model config or manifest entry is found as well.
"""

from __future__ import annotations

import glob
import json
import os
import zlib
from typing import Dict, List, Optional

import torch

CHUNK = 8 << 20
SEAL_KEY = "marker_crc32"


def crc32(path: str) -> int:
    value = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                return value
            value = zlib.crc32(block, value)


def _files_of_rank(directory: str, rank: int) -> List[str]:
    own = glob.glob(os.path.join(directory, f"__{rank}_*.distcp")) + glob.glob(os.path.join(directory, "rng", f"rank_{rank}.pt"))
    if rank == 0:  # the shared files: metadata written by the coordinator
        shared = [p for p in _all_files(directory) if not os.path.basename(p).startswith("__")
                  and not p.startswith(os.path.join(directory, "rng") + os.sep)]
        own += shared
    return sorted(set(own))


def _all_files(directory: str) -> List[str]:
    out = []
    for root, _dirs, names in os.walk(directory):
        out += [os.path.join(root, n) for n in names]
    return sorted(out)


def _gather(obj) -> list:
    if not torch.distributed.is_initialized():
        return [obj]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, obj)
    return everyone


def build(directory: str, *, marker_name: str) -> Optional[Dict[str, dict]]:
    """Collective: {relative path: {"size", "crc32"}} of every file of the checkpoint (rank 0; None elsewhere)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    mine = {os.path.relpath(p, directory): {"size": os.path.getsize(p), "crc32": crc32(p)}
            for p in _files_of_rank(directory, rank) if os.path.basename(p) != marker_name}
    merged: Dict[str, dict] = {}
    for part in _gather(mine):
        merged.update(part)
    return merged if rank == 0 else None


def problems(directory: str, files: Dict[str, dict], *, mode: str, marker_name: str) -> List[str]:
    """Collective: what is wrong with the checkpoint's files (same list on every rank)."""
    if mode == "off":
        return []
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    found: List[str] = []
    if rank == 0:
        extra = sorted(set(os.path.relpath(p, directory) for p in _all_files(directory)) - set(files) - {marker_name})
        found += [f"{os.path.join(directory, name)}: not in the checkpoint's manifest" for name in extra]
    for index, (name, expected) in enumerate(sorted(files.items())):
        if index % world != rank:
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            found.append(f"{path}: missing")
        elif os.path.getsize(path) != expected["size"]:
            found.append(f"{path}: {os.path.getsize(path)} bytes, the manifest says {expected['size']} (truncated or rewritten)")
        elif mode == "full" and crc32(path) != expected["crc32"]:
            found.append(f"{path}: checksum mismatch (the file changed after it was saved)")
    return sorted(p for part in _gather(found) for p in part)


def size_problems(directory: str, files: Dict[str, dict]) -> List[str]:
    """Local (one process) size check of a checkpoint just written, before older ones are pruned."""
    found = []
    for name, expected in files.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path) or os.path.getsize(path) != expected["size"]:
            found.append(path)
    return found


def seal(record: dict) -> dict:
    """The marker's record with a CRC32 of its other fields (canonical JSON) added."""
    body = {key: value for key, value in record.items() if key != SEAL_KEY}
    return {**body, SEAL_KEY: zlib.crc32(json.dumps(body, sort_keys=True).encode())}


def seal_problem(path: str, record: dict) -> Optional[str]:
    """What is wrong with a marker's seal (None: intact, or written before markers were sealed)."""
    if SEAL_KEY not in record or seal(record)[SEAL_KEY] == record[SEAL_KEY]:
        return None
    return f"{path}: checksum mismatch (the completion marker changed after it was saved)"
