"""Fingerprints of the Megatron-Core 0.19.2 code that our patches replace or rely on: the upgrade
canaries. tests/mcore/test_upstream_canaries.py fails, naming the patch to re-check, as soon as any of
these sources differs from the version the patch was written against.

Sources are read from the installed files (not imported), so checking needs no CUDA and no CPU layer.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

# "module:qualified.name" -> (sha256 prefix of its source in megatron-core 0.19.2, the patch that depends on it)
UPSTREAM = {
    "megatron.core.transformer.moe.ops.paged_stash:": (
        "bb1cee44ce9d605e", "cpu_compat.triton_stub (the module imports triton unguarded)"),
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker": (
        "d30430fec1ac233d", "cpu_compat.cpu_rng_tracker"),
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state": (
        "0c2b8f05b864739e", "cpu_compat.cpu_rng_tracker"),
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state": (
        "dea947ca0b7dc92b", "cpu_compat.cpu_rng_tracker"),
    "megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu": (
        "47a1092f05bae7bf", "cpu_compat.moe_split_sizes_numpy"),
    "megatron.core.tensor_parallel.mappings:_gather_along_first_dim": (
        "abaaf454b5e09149", "cpu_compat.gloo_uneven_first_dim_collectives"),
    "megatron.core.tensor_parallel.mappings:_reduce_scatter_along_first_dim": (
        "09ac896729369d2d", "cpu_compat.gloo_uneven_first_dim_collectives"),
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states": (
        "abb463384d3f18b5", "optimizer_fixes: KeyError 'step' on a fully_reshardable resume"),
    "megatron.core.optimizer.optimizer:MegatronOptimizer._filter_and_reorder_param_groups": (
        "214c3c3d1d89aa17", "optimizer_fixes: duplicate group identifiers"),
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.sharded_state_dict": (
        "20365b6e786ae9ed", "optimizer_fixes: fp32 groups' state ids"),
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._init_optimizer_states_with_dummy_values": (
        "c1aa69839875b470", "checkpoint/io.py::_prepare_optimizer_for_load"),
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict": (
        "5c2af1e56e0b8eec", "checkpoint/io.py::_set_adam_step (one shared step tensor)"),
}


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec("megatron")  # a namespace package: importing it runs nothing
    for location in spec.submodule_search_locations:
        base = Path(location).joinpath(*module.split(".")[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{module} is not in the installed megatron-core")


def source_of(target: str) -> str:
    """The source text of `module:qualname` (the whole module when qualname is empty)."""
    module, _, qualname = target.partition(":")
    text = _module_file(module).read_text()
    if not qualname:
        return text
    nodes = ast.parse(text).body
    for part in qualname.split("."):
        found = [n for n in nodes if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == part]
        if not found:
            raise LookupError(f"{target}: {part} not found (removed or renamed upstream)")
        node = found[-1]
        nodes = node.body
    return ast.get_source_segment(text, node)


def fingerprint(target: str) -> str:
    return hashlib.sha256(source_of(target).encode()).hexdigest()[:16]
