"""Where a run starts: fresh, resumed from its own latest checkpoint, or from given weights.

Split in two so the read-only part (`plan_resume`: which checkpoint, which step, which data
position) runs before anything is built, and a bad `checkpoint.load` fails in seconds.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Optional

from dsv4_train.checkpoint.io import (
    TrainState,
    checkpoint_problems,
    find_latest,
    list_complete,
    load_checkpoint,
    marker_problem,
    read_marker,
    resolve_load_path,
    save_checkpoint,
    weights_only,
)
from dsv4_train.checkpoint.paths import checkpoint_root  # noqa: F401 (re-exported)
from dsv4_train.config.schema import Config


def plan_resume(cfg: Config, ckpt_root: str, *, load_path: Optional[str] = "resolve"):
    """(checkpoint to load or None, load weights only?, TrainState to start from), read-only.

    checkpoint.load=auto resumes this run's latest complete checkpoint; a weights-only start
    (checkpoint.load_model_only) is superseded by this run's own checkpoints once it has saved.
    `load_path` given: plan from that checkpoint (a verified fallback, `choose_verified`).
    """
    model_only = cfg.checkpoint.load_model_only
    if load_path == "resolve":
        load_path = resolve_load_path(cfg.checkpoint.load, ckpt_root)
        own_latest = find_latest(ckpt_root)
        if model_only and own_latest is not None:
            load_path, model_only = own_latest, False
    elif load_path is not None and os.path.dirname(os.path.abspath(load_path)) == os.path.abspath(ckpt_root):
        model_only = False  # one of this run's own checkpoints
    start = TrainState()
    if load_path is not None:
        problem = marker_problem(load_path)
        if problem and cfg.checkpoint.verify != "off":
            return load_path, model_only, start  # choose_verified reports it (and falls back)
        if problem and "unreadable" in problem:
            raise ValueError(f"checkpoint {load_path} cannot be used: {problem}. Use another checkpoint "
                             "(checkpoint.load=<dir>).")
        marker = read_marker(load_path)
        check_same_model_shapes(marker.get("model"), asdict(cfg.model), load_path)
        if not model_only and not weights_only(load_path):
            start = TrainState(step=int(marker["step"]), consumed_samples=int(marker["consumed_samples"]))
    return load_path, model_only, start


def choose_verified(cfg: Config, ckpt_root: str, load_path: Optional[str], *, is_main: bool) -> Optional[str]:
    """Collective: `load_path` if it passes checkpoint.verify; else, for this run's own checkpoints
    (checkpoint.load=auto), the newest older one that does (each failure reported: path, file, reason);
    an explicitly requested checkpoint that fails is an error."""
    if load_path is None:
        return None
    mode = cfg.checkpoint.verify
    own = os.path.dirname(os.path.abspath(load_path)) == os.path.abspath(ckpt_root)
    candidates = [load_path]
    if own and cfg.checkpoint.load == "auto":
        candidates += [p for p in reversed(list_complete(ckpt_root)) if os.path.abspath(p) != os.path.abspath(load_path)]
    for candidate in candidates:
        problems = checkpoint_problems(candidate, mode)
        if not problems:
            if candidate != load_path and is_main:
                print(f"falling back to the newest verified checkpoint: {candidate}", flush=True)
            return candidate
        if not (own and cfg.checkpoint.load == "auto"):
            raise ValueError(f"checkpoint {candidate} failed verification (checkpoint.verify={mode}): "
                             + "; ".join(problems) + ". Use another checkpoint (checkpoint.load=<dir>).")
        if is_main:
            print(f"checkpoint {candidate} failed verification (checkpoint.verify={mode}), not loaded: "
                  + "; ".join(problems), flush=True)
    raise ValueError(f"no checkpoint under {ckpt_root} passes verification (checkpoint.verify={mode}); see the "
                     "reports above. Start fresh with checkpoint.load=none (or another run.dir).")


# Model keys that change the shape or the set of saved tensors: a checkpoint only loads into a model
# that agrees on all of them (the others, e.g. loss weights, the indexer phase or the attention
# backend, may change between runs).
SHAPE_KEYS = (
    "vocab_size", "hidden_size", "num_layers", "num_attention_heads", "head_dim", "qk_rope_head_dim",
    "q_lora_rank", "o_groups", "o_lora_rank", "compress_ratios", "index_n_heads", "index_head_dim", "hc_mult",
    "num_hash_layers", "num_routed_experts", "num_shared_experts", "moe_intermediate_size", "mtp_num_layers",
    "tie_word_embeddings",
)


def check_same_model_shapes(saved: Optional[dict], current: dict, path: str) -> None:
    """Refuse a checkpoint saved from a model of other shapes, naming each differing key."""
    if not saved:
        return  # saved before model configs were recorded
    changed = [f"model.{key}: {saved[key]} in the checkpoint, {current[key]} now"
               for key in SHAPE_KEYS if key in saved and key in current and saved[key] != current[key]]
    if changed:
        raise ValueError(
            f"checkpoint {path} was saved from a model of other shapes ({'; '.join(changed)}); its tensors "
            "cannot load into this model. Use the checkpoint's model settings, or start from another checkpoint "
            "(checkpoint.load=<dir>) or from scratch (checkpoint.load=none, or another run.dir)."
        )


def restore_or_save_initial(cfg: Config, ckpt_root: str, load_path, model_only: bool, start: TrainState, *,
                            model_chunks, optimizer, scheduler, is_main: bool) -> TrainState:
    """Load the planned checkpoint into the built model/optimizer, or save the initial weights."""
    if load_path is not None:
        start = load_checkpoint(load_path, model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler,
                                model_only=model_only)
        if model_only or weights_only(load_path):
            optimizer.reload_model_params()  # fp32 main copies (bf16 training) follow the loaded weights
        if is_main:
            what = "loaded model weights from" if model_only else "resumed from"
            print(f"{what} {load_path} at step {start.step}", flush=True)
    if cfg.checkpoint.save_initial and (load_path is None or model_only):
        # The starting weights (fresh, or loaded model-only, e.g. to re-save a converted checkpoint in
        # this layout); weights only: a fresh optimizer has no state to save yet.
        save_checkpoint(ckpt_root, model_chunks=model_chunks, optimizer=None, scheduler=None,
                        state=start, keep_last=0)
    return start
