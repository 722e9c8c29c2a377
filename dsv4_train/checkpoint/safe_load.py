"""Loading a checkpoint executes no code from it.

A checkpoint directory holds, besides raw tensor bytes, three kinds of pickles that an ordinary load
would unpickle with full power (so a planted payload would run on resume or fine-tuning):

* the distributed checkpoint's `.metadata` (torch.distributed.checkpoint unpickles it with
  `pickle.load`): checked first by `check_metadata`, an unpickler that only resolves the metadata
  classes torch writes there (dataclasses and enums of `torch.distributed.checkpoint`, `torch.Size`,
  dtypes, layouts); anything else is refused before torch reads the file;
* the non-tensor items inside `.distcp` files (scheduler and train state, optimizer groups), which
  torch's load planner reads with `torch.load(weights_only=False)`: `tensors_only_loads()` makes every
  `torch.load` during the checkpoint load a `weights_only=True` load (tensors and plain containers);
* our per-rank RNG files, written as tensors and plain values and read with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import os
import pickle

import torch

_DCP = "torch.distributed.checkpoint"
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # name -> torch.layout lookup
    ("pathlib", "PosixPath"),  # the checkpoint id torch's own FileSystemWriter records (convert import)
    (f"{_DCP}.filesystem", "_StorageInfo"),
    *((f"{_DCP}.metadata", name) for name in (
        "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
        "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *((f"{_DCP}.planner", name) for name in ("SavePlan", "TensorWriteData", "WriteItem", "WriteItemType")),
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would run code or is not what this framework writes."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"checkpoint file {self.path} refers to {module}.{name}, which a distributed-checkpoint "
            "metadata file never contains; it was not written by this framework (or was tampered with) "
            "and is not loaded, since unpickling it could run code. Use another checkpoint "
            "(checkpoint.load=<dir>) or delete this one."
        )


def check_metadata(checkpoint_dir: str) -> None:
    """Refuse a `.metadata` that needs anything beyond the distributed-checkpoint metadata classes."""
    path = os.path.join(checkpoint_dir, ".metadata")
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except OSError as error:
        raise UnsafeCheckpointError(f"checkpoint file {path} cannot be read ({error.strerror or error}).") from None
    except Exception as error:  # truncated or garbled pickle
        raise UnsafeCheckpointError(
            f"checkpoint file {path} is damaged ({type(error).__name__}: {error}); use another checkpoint "
            "(checkpoint.load=<dir>) or delete this one."
        ) from None


@contextlib.contextmanager
def tensors_only_loads():
    """Within: `torch.load` never unpickles arbitrary objects (`weights_only=True` is forced)."""
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def refused_unpickling(error: BaseException) -> bool:
    """Whether a failed checkpoint load was a tensors-only load refusing an object (not, e.g., I/O).
    torch.distributed.checkpoint wraps each rank's error in a CheckpointException (`failures`)."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, pickle.UnpicklingError):
            return True
        pending += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending += [f[0] for f in failures.values() if isinstance(f, tuple) and f]
    return False


def _numpy_array_globals() -> list:
    """numpy's array reconstruction (data only, no code): what RNG files written before RNG states
    were stored as tensors contain."""
    import numpy

    found = [numpy.ndarray, numpy.dtype, type(numpy.dtype(numpy.uint32))]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            found.append(__import__(module, fromlist=["_reconstruct"])._reconstruct)
        except (ImportError, AttributeError):
            continue
    return found


def load_tensors_file(path: str):
    """`torch.load` of a file we wrote with tensors and plain values only (and, for files of earlier
    versions, numpy arrays: allow-listed array reconstruction, still no code)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        pass
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"checkpoint file {path} holds objects other than tensors and plain values and is not loaded "
            f"(it could run code): {str(error).splitlines()[0]}. Use another checkpoint or delete this one."
        ) from None
