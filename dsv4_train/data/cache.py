"""Where prepared data lives, and how it is written safely when several processes start at once.

Three rules keep the cache trustworthy:
- Every file is written under a temporary name in the same directory and renamed into place with
  `os.replace` (atomic on POSIX), so a reader sees either nothing or the whole file; a killed writer
  leaves only `*.tmp-*` debris, which nothing reads.
- Directories filled by code we do not control (Megatron's dataset index caches) get a `.complete`
  marker after they are fully written; a directory without the marker is deleted and rebuilt.
- Preparation runs under an exclusive `fcntl` lock on `<cache>/.lock`, so concurrent processes that
  share a cache (independent runs, or ranks without torch.distributed) build once and reuse.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

_LOCK_NAME = ".lock"
COMPLETE_MARKER = ".complete"


def default_cache_dir() -> Path:
    """`<repo>/.cache/data` for a source checkout (gitignored); `$XDG_CACHE_HOME/dsv4_train/data` otherwise."""
    package_parent = Path(__file__).resolve().parents[2]
    if (package_parent / "pyproject.toml").is_file():
        return package_parent / ".cache" / "data"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dsv4_train" / "data"


def resolve_cache_dir(configured: Optional[str]) -> Path:
    """The cache directory for `data.cache_dir` (None = default), created if missing.

    Raises:
        ValueError: when the directory cannot be created or written.
    """
    path = Path(configured).expanduser().resolve() if configured else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as error:
        raise ValueError(
            f"data.cache_dir: cannot create or write the data cache directory {path} ({error}). "
            f"Set data.cache_dir to a writable directory (it holds the tokenizer, the tokenized "
            f"embedded corpus and dataset index caches)."
        ) from None
    return path


@contextlib.contextmanager
def exclusive_lock(cache_dir: Path, *, poll_s: float = 0.2, log_after_s: float = 10.0) -> Iterator[None]:
    """Hold an exclusive lock on the cache directory (blocking; tells the user if it waits long)."""
    lock_path = cache_dir / _LOCK_NAME
    with open(lock_path, "a+") as handle:
        started = time.monotonic()
        announced = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced and time.monotonic() - started > log_after_s:
                    print(f"[data] waiting for another process preparing {cache_dir} ...", flush=True)
                    announced = True
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def temporary_sibling(final_path: Path) -> Path:
    """A unique temporary name next to `final_path` (same filesystem, so `os.replace` is atomic)."""
    return final_path.with_name(f"{final_path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")


def write_text_atomic(final_path: Path, text: str) -> None:
    tmp = temporary_sibling(final_path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, final_path)
    finally:
        if tmp.exists():
            tmp.unlink()


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETE_MARKER).is_file()


def mark_complete(directory: Path) -> None:
    write_text_atomic(directory / COMPLETE_MARKER, "complete\n")


def discard_if_incomplete(directory: Path) -> None:
    """Delete a directory that a crashed writer left without its completion marker."""
    if directory.exists() and not is_complete(directory):
        shutil.rmtree(directory)
