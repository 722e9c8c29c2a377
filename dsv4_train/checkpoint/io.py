"""Save and resume training state with `megatron.core.dist_checkpointing`.

Layout of a checkpoint root (default `<run.dir>/checkpoints`):

    step_00000010/          a complete checkpoint (dist_checkpointing torch_dist format)
        dsv4_complete.json  written last; its presence is what makes the directory "complete"
        rng/rank_<r>.pt     per-rank RNG states
    step_00000020.partial/  a save in progress (or one that crashed): never loaded, removed later
    latest                  text file naming the newest complete checkpoint (atomically replaced)

A save writes into `<name>.partial`, then rank 0 writes the completion marker, renames the
directory, and replaces `latest` (write to a temp file + os.replace). A crash at any point leaves
the previous checkpoint loadable, and `latest` never names a directory that is not complete.

Megatron-Core 0.19.2's DistributedOptimizer on the torch.optim fallback path has three resume bugs
(tests/parallel/test_cross_layout_resume.py); `_prepare_optimizer_for_load` and `_set_adam_step` below are our
fixes, applied on every device.

Optimizer state is saved in a layout-independent per-parameter form (`OPTIMIZER_LAYOUT`): one
sharded tensor per (state, parameter), e.g. `optimizer.state.exp_avg.layers.3.attn.wq_b.weight`,
taken from each sub-optimizer's `fully_reshardable` state and merged into ONE flat dict, plus the
single Adam step count. Megatron's own `ChainedOptimizer` format prefixes keys with the index of the
sub-optimizer (`chained_1.`), and the number of sub-optimizers depends on the layout (one with EP=1,
dense + expert with EP>1), so its checkpoints do not load across EP=1 <-> EP>1
(tests/parallel/test_cross_layout_resume.py). At load, each sub-optimizer of the new layout asks for its own
parameters by these keys; hyper-parameters come from the run's config and the scheduler state.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from dsv4_train.checkpoint import manifest, writer_queue
from dsv4_train.checkpoint.safe_load import (
    UnsafeCheckpointError,
    check_metadata,
    load_tensors_file,
    refused_unpickling,
    tensors_only_loads,
)

COMPLETE_MARKER = "dsv4_complete.json"
LATEST_FILE = "latest"
PARTIAL_SUFFIX = ".partial"
FORMAT_VERSION = 2  # 2: per-parameter optimizer state (OPTIMIZER_LAYOUT); 1: Megatron's chained format
OPTIMIZER_LAYOUT = "per_param_v1"
_DISTOPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointNotFoundError(ValueError):
    """An explicitly requested checkpoint does not exist or is incomplete."""


@dataclass
class TrainState:
    """What, besides model and optimizer, a resume must restore."""

    step: int = 0
    consumed_samples: int = 0
    mtp_loss_weight: Optional[float] = None


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def list_complete(root: str) -> List[str]:
    if not os.path.isdir(root):
        return []
    names = sorted(
        name
        for name in os.listdir(root)
        if name.startswith("step_") and not name.endswith(PARTIAL_SUFFIX) and is_complete(os.path.join(root, name))
    )
    return [os.path.join(root, name) for name in names]


def find_latest(root: str) -> Optional[str]:
    """Newest complete checkpoint under root, or None. Trusts `latest` only if it is complete."""
    latest_file = os.path.join(root, LATEST_FILE)
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            name = f.read().strip()
        candidate = os.path.join(root, name)
        if name and is_complete(candidate):
            return candidate
    complete = list_complete(root)
    return complete[-1] if complete else None


def resolve_load_path(load: str, root: str) -> Optional[str]:
    """Map `checkpoint.load` to a checkpoint directory, or None to start fresh.

    auto: latest complete checkpoint under root, fresh start if there is none.
    none: fresh start. Anything else is a path that must be a complete checkpoint (or a root
    holding one); a missing one is an error, never a silent fresh start.
    """
    if load == "none":
        return None
    if load == "auto":
        return find_latest(root)
    path = os.path.abspath(load)
    if os.path.isdir(path) and is_complete(path):
        return path
    if os.path.isdir(path):
        found = find_latest(path)
        if found:
            return found
    raise CheckpointNotFoundError(
        f"checkpoint.load={load!r}: no complete checkpoint there (expected a directory containing "
        f"{COMPLETE_MARKER}, or a checkpoint root with step_* directories). Fix the path, use "
        "checkpoint.load=auto to resume from the latest checkpoint of this run if any, or "
        "checkpoint.load=none to start fresh."
    )


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _sharded_state_dict(model_chunks, optimizer, scheduler, state: TrainState, *, is_loading: bool,
                        legacy_optimizer_format: bool = False):
    from megatron.core.dist_checkpointing.mapping import ShardedObject  # noqa: F401 (kept for clarity)

    sharded = {}
    model_sharded = {}
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        chunk_sd = _unwrap(chunk).sharded_state_dict()
        sharded[key] = chunk_sd
        model_sharded.update(chunk_sd)
    if optimizer is not None:
        from dsv4_train import mcore

        mcore.require_applied()
        if is_loading:
            _prepare_optimizer_for_load(optimizer)
        if legacy_optimizer_format:
            sharded["optimizer"] = optimizer.sharded_state_dict(
                model_sharded, is_loading=is_loading, metadata=dict(_DISTOPT_METADATA)
            )
        else:
            sharded["optimizer"] = _per_param_optimizer_state(optimizer, model_sharded, is_loading=is_loading)
    if scheduler is not None:
        sharded["scheduler"] = scheduler.state_dict()
    sharded["train_state"] = {
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "mtp_loss_weight": state.mtp_loss_weight,
        "format_version": FORMAT_VERSION,
    }
    return sharded


def save_checkpoint(root: str, *, model_chunks, optimizer, scheduler, state: TrainState, keep_last: int = 0,
                    protect: Sequence[Optional[str]] = ()) -> str:
    """Save a complete checkpoint for `state.step`; returns its directory.

    Then prune to the `keep_last` newest complete checkpoints, never deleting the one just written
    (the newest verified: it matches its manifest's sizes) nor any in `protect` (the checkpoint the
    run resumed from, train/checkpointer.py). A new checkpoint that does not match its manifest prunes
    nothing."""
    from megatron.core import dist_checkpointing

    final = os.path.join(root, step_dir_name(state.step))
    partial = final + PARTIAL_SUFFIX

    def prepare() -> None:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(partial):
            shutil.rmtree(partial)  # a crashed earlier attempt at this same step
        os.makedirs(partial)

    def save_rng() -> None:
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(partial, "rng", f"rank_{_rank()}.pt"))

    def seal_and_publish() -> None:
        write_marker(partial, {
            "step": state.step,
            "consumed_samples": state.consumed_samples,
            "world_size": _world(),
            "layout": _layout(),
            "contents": "full" if optimizer is not None else "model",
            "model": _model_config(model_chunks),
            "code_version": _code_version(),
            "files": files,  # the manifest (checkpoint/manifest.py)
        })
        if os.path.isdir(final):  # re-saving a step (e.g. preempted right after a periodic save)
            stale = final + ".old"
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(partial, final)
        _write_latest(root, os.path.basename(final))
        damaged = manifest.size_problems(final, files)
        if damaged:  # never prune the older, intact checkpoints for a damaged new one
            print(f"checkpoint {final} does not match its manifest right after saving ({', '.join(damaged)}); "
                  "older checkpoints are kept", flush=True)
        else:
            _prune(root, keep_last=keep_last, keep=(final, *protect))

    _on_ranks(prepare, rank0_only=True)
    sharded = _sharded_state_dict(model_chunks, optimizer, scheduler, state, is_loading=False)
    writer_queue.install()  # Megatron's writer manager process must not outlive a killed trainer
    dist_checkpointing.save(sharded, partial)  # collective: a write failure is raised on every rank
    _on_ranks(save_rng)
    files = manifest.build(partial, marker_name=COMPLETE_MARKER)  # collective: every rank checksums its files
    _on_ranks(seal_and_publish, rank0_only=True)
    return final


def _on_ranks(action, *, rank0_only: bool = False) -> None:
    """Collective: run `action` on every rank (or on rank 0 only), then agree on the outcome, so that
    no rank waits forever in a barrier for one that failed: a failing rank raises its own error, the
    others an OSError (with errno and path) or RuntimeError rebuilt from the first failure."""
    failure = None
    if not rank0_only or _rank() == 0:
        try:
            action()
        except Exception as error:
            failure = error
    summary = None if failure is None else (
        _rank(), getattr(failure, "errno", None), getattr(failure, "strerror", None),
        getattr(failure, "filename", None), f"{type(failure).__name__}: {failure}")
    summaries = [summary]
    if torch.distributed.is_initialized():
        summaries = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(summaries, summary)
    if failure is not None:
        raise failure
    first = next((item for item in summaries if item is not None), None)
    if first is not None:
        rank, code, strerror, filename, text = first
        if code is not None:
            raise OSError(code, strerror, filename)
        raise RuntimeError(f"rank {rank} failed while saving a checkpoint: {text}")


def load_checkpoint(path: str, *, model_chunks, optimizer, scheduler, model_only: bool = False) -> TrainState:
    """Load model, optimizer, scheduler, train state and (same world size) RNG from `path`.

    model_only: load the weights (and model buffers: hash tables, expert bias) only and return a
    fresh TrainState, for fine-tuning or for starting several layouts from identical weights.
    """
    from megatron.core import dist_checkpointing

    check_metadata(path)  # before anything lets torch.distributed.checkpoint unpickle it
    model_only = model_only or weights_only(path)
    if model_only:
        optimizer = scheduler = None
    legacy = optimizer is not None and _saved_optimizer_layout(path) != OPTIMIZER_LAYOUT
    sharded = _sharded_state_dict(model_chunks, optimizer, scheduler, TrainState(), is_loading=True,
                                  legacy_optimizer_format=legacy)
    fresh = initialised_on_load(path)
    if model_only:
        sharded = {key: value for key, value in sharded.items() if key.startswith("model")}
        for key in sharded:  # parts a converted checkpoint leaves out (e.g. MTP absent from the source)
            sharded[key] = {k: v for k, v in sharded[key].items() if not k.startswith(fresh)}
    # Where each loaded optimizer tensor goes back (not part of the request: its leaves are in "tensors").
    templates = request_tensors = None
    if optimizer is not None and not legacy:
        templates = sharded["optimizer"].pop("_templates")
        request_tensors = dict(sharded["optimizer"]["tensors"])  # load() may replace entries in place
    loaded = _load_tensors_only(path, lambda: dist_checkpointing.load(sharded, path))
    for index, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{index}"
        result = _unwrap(chunk).load_state_dict(loaded[key], strict=not fresh)
        unexpected_missing = [k for k in getattr(result, "missing_keys", []) if not k.startswith(fresh)]
        if unexpected_missing or getattr(result, "unexpected_keys", []):
            raise ValueError(f"checkpoint {path}: tensors missing {unexpected_missing[:3]} / unexpected "
                             f"{result.unexpected_keys[:3]} for this model.")
    if model_only:
        return TrainState()
    if optimizer is not None and legacy:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_step_tensors(optimizer)
    elif optimizer is not None:
        _load_per_param_optimizer_state(optimizer, templates, request_tensors, loaded["optimizer"])
    if scheduler is not None:
        _report_schedule_changes(loaded["scheduler"], scheduler.state_dict())
        scheduler.load_state_dict(loaded["scheduler"])
    train_state = loaded["train_state"]
    rng_file = os.path.join(path, "rng", f"rank_{_rank()}.pt")
    if os.path.isfile(rng_file) and _saved_world(path) == _world():
        _set_rng_state(load_tensors_file(rng_file))
    return TrainState(
        step=int(train_state["step"]),
        consumed_samples=int(train_state["consumed_samples"]),
        mtp_loss_weight=train_state.get("mtp_loss_weight"),
    )


_SCHEDULE_KEYS = ("max_lr", "min_lr", "lr_warmup_steps", "lr_decay_steps", "lr_decay_style", "start_wd", "end_wd",
                  "wd_incr_steps", "wd_incr_style")


def _report_schedule_changes(saved: dict, current: dict) -> None:
    """The LR schedule follows the current config (optimizer.py); say what differs from the checkpoint."""
    changed = [f"{key} {saved[key]} -> {current[key]}" for key in _SCHEDULE_KEYS
               if key in saved and saved[key] != current.get(key)]
    if changed and _rank() == 0:
        print("LR schedule follows the current config (checkpoint -> now): " + ", ".join(changed), flush=True)


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dsv4-train")
    except PackageNotFoundError:
        return "unknown"


def write_marker(directory: str, record: dict) -> None:
    """Write the completion marker (sealed with its own checksum) last, durably."""
    with open(os.path.join(directory, COMPLETE_MARKER), "w") as f:
        json.dump(manifest.seal(record), f)
        f.flush()
        os.fsync(f.fileno())


def read_marker(path: str) -> dict:
    """The completion marker of checkpoint `path` (OSError / ValueError when unreadable)."""
    with open(os.path.join(path, COMPLETE_MARKER)) as f:
        record = json.load(f)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def marker_problem(path: str) -> Optional[str]:
    """Why the completion marker of `path` cannot be trusted (None: it can)."""
    marker_path = os.path.join(path, COMPLETE_MARKER)
    try:
        return manifest.seal_problem(marker_path, read_marker(path))
    except (OSError, ValueError) as error:
        return f"{marker_path}: unreadable ({error})"


def checkpoint_problems(path: str, mode: str) -> List[str]:
    """Collective: what verification (`checkpoint.verify`) finds wrong with `path` (the same on every rank)."""
    if mode == "off":
        return []
    problem = marker_problem(path)
    if problem:
        return [problem]
    files = read_marker(path).get("files")
    if files is None:
        return []  # saved before manifests existed
    return manifest.problems(path, files, mode=mode, marker_name=COMPLETE_MARKER)


def _model_config(model_chunks) -> Optional[dict]:
    """The V4 model config the checkpoint was saved from (checked on resume: checkpoint/resume.py)."""
    from dataclasses import asdict

    chunk = model_chunks[0]
    while not hasattr(chunk, "model_cfg") and hasattr(chunk, "module"):
        chunk = chunk.module
    return asdict(chunk.model_cfg) if hasattr(chunk, "model_cfg") else None


def initialised_on_load(path: str) -> tuple:
    """Name prefixes a converted checkpoint does not hold (the model keeps their fresh initialisation)."""
    try:
        with open(os.path.join(path, COMPLETE_MARKER)) as f:
            return tuple(json.load(f).get("initialise_on_load") or ())
    except (OSError, ValueError):
        return ()


def weights_only(path: str) -> bool:
    """A checkpoint saved without optimizer state (e.g. checkpoint.save_initial)."""
    try:
        with open(os.path.join(path, COMPLETE_MARKER)) as f:
            return json.load(f).get("contents") == "model"
    except (OSError, ValueError):
        return False


def _unwrap(chunk):
    """The MegatronModule inside a DDP wrapper: checkpoints hold model keys, not wrapper keys."""
    return getattr(chunk, "module", chunk)


# --- optimizer fixes for Megatron-Core 0.19.2 -------------------------------------------------
def _sub_optimizers(optimizer):
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _prepare_optimizer_for_load(optimizer) -> None:
    """A fresh DistributedOptimizer has no state; `state_dict()` then asserts. Allocate it first."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from dsv4_train import mcore

    mcore.require_applied()

    for sub in _sub_optimizers(optimizer):
        if isinstance(sub, DistributedOptimizer) and len(sub.optimizer.state) == 0:
            sub._init_optimizer_states_with_dummy_values()


def _unshare_adam_step_tensors(optimizer) -> None:
    """DistributedOptimizer.load_state_dict gives every param the SAME `step` tensor; torch AdamW
    increments it in place once per param, so each step would advance it many times."""
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", sub)
        for param_state in inner.state.values():
            step = param_state.get("step")
            if torch.is_tensor(step):
                param_state["step"] = step.detach().clone()


# --- layout-independent optimizer state ------------------------------------------------------
def _sharded_leaves(tree):
    """Every ShardedTensor / ShardedTensorFactory / ShardedObject in a nested dict / list."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    if isinstance(tree, ShardedBase):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _sharded_leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _sharded_leaves(value)


def _replace_sharded_leaves(tree, loaded_by_leaf: dict):
    """`tree` with each sharded leaf replaced by `loaded_by_leaf[id(leaf)]`, local objects unwrapped."""
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    if isinstance(tree, ShardedBase):
        return loaded_by_leaf[id(tree)]
    if isinstance(tree, LocalNonpersistentObject):
        return tree.unwrap()
    if isinstance(tree, dict):
        return {k: _replace_sharded_leaves(v, loaded_by_leaf) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_replace_sharded_leaves(v, loaded_by_leaf) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_replace_sharded_leaves(v, loaded_by_leaf) for v in tree)
    return tree


def _per_param_optimizer_state(optimizer, model_sharded, *, is_loading: bool) -> dict:
    """{"layout", "step", "tensors": {slot: sharded leaf}} over all sub-optimizers (see module doc).

    Only the leaves' own checkpoint keys (`leaf.key` + offsets, layout-independent) decide what is
    saved and loaded; the slot names just keep this rank's leaves apart in one flat dict (the local
    experts of one MoE layer are several shards of the same key). When loading, each
    sub-optimizer's own sharded state dict is kept (not saved) under "_templates": it knows where
    each loaded tensor goes back."""
    templates = [
        sub.sharded_state_dict(model_sharded, is_loading=is_loading, metadata=dict(_DISTOPT_METADATA))
        for sub in _sub_optimizers(optimizer)
    ]
    for sub, template in zip(_sub_optimizers(optimizer), templates):
        _owned_state_is_main_replica(sub, template)
    tensors = {}
    for template in templates:
        for leaf in _sharded_leaves(template):
            tensors[f"{len(tensors):06d}:{leaf.key}"] = leaf
    state = {"layout": OPTIMIZER_LAYOUT, "step": None if is_loading else _adam_step(optimizer), "tensors": tensors}
    if is_loading:
        state["_templates"] = templates
    return state


def _owned_state_is_main_replica(sub, template: dict) -> None:
    """Muon's data-parallel sharded state (train/muon.py) exists only on each parameter's owner:
    that copy is the main replica (replica id (pp, tp, dp): its dp part set to 0), saved by it."""
    if not getattr(getattr(sub, "optimizer", None), "owners", None):
        return
    torch_state = template.get("optimizer", template)
    for leaf in _sharded_leaves(torch_state["state"]):
        leaf.replica_id = (*leaf.replica_id[:-1], 0)


def _load_per_param_optimizer_state(optimizer, templates: list, request_tensors: dict, loaded: dict) -> None:
    step = loaded["step"]
    loaded_by_leaf = {id(leaf): loaded["tensors"][slot] for slot, leaf in request_tensors.items()}
    with torch.no_grad():
        for sub, template in zip(_sub_optimizers(optimizer), templates):
            state = _replace_sharded_leaves(template, loaded_by_leaf)
            _put_common_step(state, step)
            sub.load_state_dict(state)
    if step is not None:
        _set_adam_step(optimizer, step)


def _put_common_step(state: dict, step: Optional[int]) -> None:
    """The non-distributed optimizers (FP32Optimizer, Float16Optimizer...) restore torch Adam's
    per-parameter `step` from `state['common_step']` of their torch state dict, which the fresh
    optimizer's template lacks (its step is 0, and Megatron stores it only when non-zero)."""
    if step is None:
        return
    for torch_state in (state, state.get("optimizer")):
        if isinstance(torch_state, dict) and isinstance(torch_state.get("state"), dict) and "param_groups" in torch_state:
            torch_state["state"]["common_step"] = torch.tensor(float(step))


def _adam_step(optimizer) -> Optional[int]:
    """The optimizer-step count shared by every parameter: torch Adam keeps one per parameter,
    fused Adam (TE / Apex, GPU) one per param group."""
    steps = set()
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", sub)
        for param_state in inner.state.values():
            if "step" in param_state:
                steps.add(int(param_state["step"]))
        if not steps:
            steps.update(int(g["step"]) for g in inner.param_groups if g.get("params") and g.get("step") is not None)
    assert len(steps) <= 1, f"parameters disagree on the optimizer step: {sorted(steps)}"
    return steps.pop() if steps else None


def _set_adam_step(optimizer, step: int) -> None:
    """One `step` tensor PER parameter: Megatron's DistributedOptimizer.load_state_dict shares one
    tensor between all parameters, and torch AdamW increments it in place once per parameter
    (so Adam's bias correction would run ahead after a resume)."""
    for sub in _sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", sub)
        for param_state in inner.state.values():
            if "step" in param_state:
                old = param_state["step"]
                param_state["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device) if torch.is_tensor(old) else step
        for group in inner.param_groups:
            if "step" in group:
                group["step"] = step


def _saved_optimizer_layout(path: str) -> Optional[str]:
    from megatron.core import dist_checkpointing

    common = _load_tensors_only(path, lambda: dist_checkpointing.load_common_state_dict(path))
    optimizer_state = common.get("optimizer") if isinstance(common, dict) else None
    return optimizer_state.get("layout") if isinstance(optimizer_state, dict) else None


def _load_tensors_only(path: str, load):
    """Run a distributed-checkpoint load of `path` with tensors-only unpickling; a refused object
    becomes one message naming the checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        with tensors_only_loads():
            return load()
    except (Exception, CheckpointException) as error:
        if not refused_unpickling(error):
            raise
    raise UnsafeCheckpointError(
        f"checkpoint {path}: an item of its .distcp files holds objects other than tensors and plain values "
        "and is not loaded (unpickling it could run code); it was not written by this framework or was "
        "tampered with. Use another checkpoint (checkpoint.load=<dir>) or delete this one.")


# --- helpers ---------------------------------------------------------------------------------
def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _layout() -> Optional[dict]:
    """The parallel layout the checkpoint was saved from (recorded; any layout can load it)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "cp": ps.get_context_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _saved_world(path: str) -> Optional[int]:
    try:
        with open(os.path.join(path, COMPLETE_MARKER)) as f:
            return json.load(f).get("world_size")
    except (OSError, ValueError):
        return None


def _rng_state() -> dict:
    """Every generator's state as tensors and plain values, so that it loads with weights_only=True."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        # Only a run that uses CUDA has a CUDA generator to save (run.device=cpu on a GPU host has not).
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    py, nps = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"])
    if isinstance(nps, dict):
        nps = (nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"])
    random.setstate(py)  # tuples: an RNG file written before the states were stored as tensors
    np.random.set_state(nps)
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST_FILE))


def _prune(root: str, *, keep_last: int, keep: Sequence[Optional[str]]) -> List[str]:
    """Remove leftover `.partial` saves and all but the `keep_last` newest complete checkpoints under
    `root` (keep_last <= 0: none of them); a checkpoint in `keep` (paths, None ignored) is never
    removed, whatever its age. Returns what was removed."""
    protected = {os.path.realpath(path) for path in keep if path}
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(PARTIAL_SUFFIX) and os.path.realpath(path[: -len(PARTIAL_SUFFIX)]) not in protected:
            removed.append(path)
    if keep_last > 0:
        removed += [path for path in list_complete(root)[:-keep_last] if os.path.realpath(path) not in protected]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
