"""A context the model enters around its compute, set by the Megatron-Core seam.

On a CPU run the CPU layer (cpu_compat.py) sets it to step its per-call dispatch hook aside (model
compute never needs it); elsewhere it does nothing. Model code imports only this module, so it depends
on no runtime code.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

_factory: Callable[[], ContextManager] = contextlib.nullcontext


def model_compute() -> ContextManager:
    return _factory()


def set_model_compute(factory: Callable[[], ContextManager]) -> None:
    global _factory
    _factory = factory
