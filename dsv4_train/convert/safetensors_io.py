"""Tensor-at-a-time safetensors reading and writing with bounded memory.

Written by hand (the format is an 8-byte header length, a JSON header, then raw little-endian
bytes): `safetensors.safe_open` maps whole shards, so the pages of every tensor read stay in the
process's resident set until the shard is closed; here each tensor is read with one `readinto` into
its own buffer and released when the caller drops it, and a writer streams tensors into shards whose
header is computed up front. That keeps a conversion's memory at a few tensors, whatever the model size.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype, shape."""

    file: str
    begin: int
    end: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str) -> Dict[str, TensorInfo]:
    """The tensors of one .safetensors file (no data read). ValueError names the file if malformed."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error}).") from None
    start = 8 + length
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, which dsv4-train does not read "
                             f"(known: {sorted(DTYPES)}).")
        begin, end = entry["data_offsets"]
        info = TensorInfo(path, start + begin, start + end, DTYPES[entry["dtype"]], tuple(entry["shape"]))
        if info.end > size or info.nbytes != math.prod(info.shape) * info.dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} {list(info.shape)} {entry['dtype']} does not fit its byte range "
                             f"[{begin}, {end}) (file truncated or damaged?).")
        infos[name] = info
    return infos


def read_directory(directory: str) -> Dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory (single file, or sharded with an index)."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as handle:
                weight_map = json.load(handle)["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{index}: unreadable index ({error}).") from None
        shards = sorted(set(weight_map.values()))
        absent = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
        if absent:
            raise ValueError(f"{index} lists shard(s) that do not exist: {absent[:3]}; copy the missing files.")
    elif os.path.isfile(os.path.join(directory, SINGLE_FILE)):
        weight_map, shards = None, [SINGLE_FILE]
    else:
        raise ValueError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}.")
    infos: Dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in read_header(os.path.join(directory, shard)).items():
            if name in infos:
                raise ValueError(f"tensor {name} appears in two shards ({infos[name].file}, {info.file}).")
            infos[name] = info
    if weight_map is not None:
        listed_absent = sorted(n for n in weight_map if n not in infos)
        if listed_absent:
            raise ValueError(f"{index} lists tensor(s) no shard holds, e.g. {listed_absent[:3]}.")
    return infos


def load_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into storage of its own (torch-allocated, so it can be released early)."""
    tensor = torch.empty(info.shape, dtype=info.dtype)
    if not info.nbytes:
        return tensor
    with open(info.file, "rb") as handle:
        handle.seek(info.begin)
        # Into the tensor's own memory (a numpy view would pin the storage: it could not be released early).
        target = (ctypes.c_char * info.nbytes).from_address(tensor.data_ptr())
        if handle.readinto(memoryview(target).cast("B")) != info.nbytes:
            raise ValueError(f"{info.file}: short read (file truncated?).")
    return tensor


def _header_bytes(entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]]) -> Tuple[bytes, List[int]]:
    header, offsets, position = {}, [], 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [position, position + nbytes]}
        offsets.append(nbytes)
        position += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return raw, offsets


def plan_shards(entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]], max_shard_bytes: int
                ) -> List[List[Tuple[str, torch.dtype, Tuple[int, ...]]]]:
    """Group tensors (in order) into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: List[list] = [[]]
    used = 0
    for entry in entries:
        nbytes = math.prod(entry[2]) * entry[1].itemsize
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += nbytes
    return [s for s in shards if s]


def write_shard(path: str, entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                produce: Callable[[str], torch.Tensor]) -> None:
    """Write one shard, calling produce(name) for each tensor in order (one tensor in memory at a time)."""
    header, sizes = _header_bytes(entries)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for (name, dtype, shape), nbytes in zip(entries, sizes):
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"tensor {name}: produced {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}.")
            if nbytes:
                handle.write(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())  # no extra copy
        handle.flush()
        os.fsync(handle.fileno())


def write_index(directory: str, shard_entries: Iterable[Tuple[str, Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]]]]
                ) -> None:
    weight_map, total = {}, 0
    for file_name, entries in shard_entries:
        for name, dtype, shape in entries:
            total += math.prod(shape) * dtype.itemsize
            weight_map[name] = file_name
    with open(os.path.join(directory, INDEX_FILE), "w") as handle:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
