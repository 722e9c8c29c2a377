"""Import a DeepSeek-V4 Hugging Face checkpoint (config.json + safetensors) into `DSV4Model`.

Accepted layouts:
* DeepSeek's native naming as released (`embed.weight`, `layers.N.attn.wq_a.weight`,
  `layers.N.ffn.experts.E.w1.weight`, `layers.N.ffn.gate.tid2eid`, `hc_head_fn`, `mtp.0.*`,
  `head.weight`, `norm.weight`);
* what transformers' `DeepseekV4ForCausalLM.save_pretrained` writes (measured with transformers
  5.24): the same names under a `model.` prefix, except `model.embed_tokens.weight`,
  `model.hc_head.hc_{fn,base,scale}` and `head.weight`; the main attention's KV norm is written as
  `attn.norm.weight` (official: `attn.kv_norm.weight`). Both are accepted.
* single `model.safetensors` or sharded with `model.safetensors.index.json`;
* DeepSeek's release format: FP8 block-scaled linears and packed FP4 routed experts with their
  `.scale` (or `weight_scale_inv`) tensors are dequantised exactly (bridge/release_format.py; the
  names dequantised are in `model.hf_import_report["dequantized_fp8" / "dequantized_fp4"]`).
Configs: transformers' (`layer_types` / `compress_rates` / `mlp_layer_types` / `rope_parameters`),
the official HF one (`compress_ratios`, `num_hash_layers`, `rope_scaling`) and the official
inference ModelArgs naming (`dim`, `n_layers`, `window_size`, ...).

MTP: transformers does not implement MTP and its saves carry no `mtp.*` tensors. When the config
declares MTP layers but the checkpoint has none, the MTP block keeps its fresh initialisation, a
warning names the missing tensors and `model.hf_import_report["mtp_initialised"]` lists them; the
release's `mtp.0.*` tensors are imported. Any other missing tensor, any unused tensor, a shape
mismatch, a quantised weight without its scale (or a scale of the wrong shape), or an unknown
quantisation method raise one ValueError naming them.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from typing import Dict, List, Optional

import torch

from dsv4_train.bridge.release_format import dequantize
from dsv4_train.config.model import ModelConfig, YarnConfig

_HF_LAYER_TYPE_RATIO_KEY = {
    "sliding_attention": None,
    "compressed_sparse_attention": "compressed_sparse_attention",
    "heavily_compressed_attention": "heavily_compressed_attention",
}
_DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def _first(raw: dict, *names, default=None):
    for name in names:
        if name in raw and raw[name] is not None:
            return raw[name]
    return default


def _compress_ratios(raw: dict, num_layers: int, mtp_layers: int) -> List[int]:
    ratios = raw.get("compress_ratios")
    if ratios is not None:
        ratios = [int(r) for r in ratios]
    elif raw.get("layer_types") is not None:
        rates = dict(_DEFAULT_COMPRESS_RATES)
        rates.update(raw.get("compress_rates") or {})
        ratios = []
        for kind in raw["layer_types"]:
            if kind not in _HF_LAYER_TYPE_RATIO_KEY:
                raise ValueError(f"config.json layer_types contains {kind!r}; expected one of {sorted(_HF_LAYER_TYPE_RATIO_KEY)}.")
            key = _HF_LAYER_TYPE_RATIO_KEY[kind]
            ratios.append(0 if key is None else int(rates[key]))
    else:
        raise ValueError("config.json has neither `compress_ratios` nor `layer_types`; cannot tell the attention schedule.")
    if len(ratios) < num_layers:
        raise ValueError(f"config.json gives {len(ratios)} attention types for {num_layers} layers.")
    main = ratios[:num_layers]
    extra = ratios[num_layers:]
    # The MTP blocks are pure sliding-window (paper §2.1, §4.2.2); the official config lists them explicitly.
    mtp = (extra + [0] * mtp_layers)[:mtp_layers]
    return main + mtp


def _num_hash_layers(raw: dict) -> int:
    if raw.get("mlp_layer_types") is not None:
        count = 0
        for kind in raw["mlp_layer_types"]:
            if kind != "hash_moe":
                break
            count += 1
        if "hash_moe" in raw["mlp_layer_types"][count:]:
            raise ValueError("config.json mlp_layer_types has hash_moe layers after scored ones; V4 hashes only the first layers.")
        return count
    return int(_first(raw, "num_hash_layers", "n_hash_layers", default=3))


def _yarn(raw: dict) -> YarnConfig:
    none = YarnConfig(factor=1.0, original_max_position_embeddings=0, beta_fast=32.0, beta_slow=1.0)
    params = None
    rope_parameters = raw.get("rope_parameters")
    if isinstance(rope_parameters, dict):
        params = rope_parameters.get("compress") if isinstance(rope_parameters.get("compress"), dict) else rope_parameters
    if params is None and isinstance(raw.get("rope_scaling"), dict):
        params = raw["rope_scaling"]
    if params is not None:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return none
        if kind != "yarn":
            raise ValueError(f"config.json compressed-layer RoPE type {kind!r} is not supported; V4 uses yarn.")
        return YarnConfig(
            factor=float(params["factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            beta_fast=float(params.get("beta_fast", 32.0)),
            beta_slow=float(params.get("beta_slow", 1.0)),
        )
    if "rope_factor" in raw:  # official inference ModelArgs naming
        return YarnConfig(
            factor=float(raw["rope_factor"]),
            original_max_position_embeddings=int(raw.get("original_seq_len", 0)),
            beta_fast=float(raw.get("beta_fast", 32.0)),
            beta_slow=float(raw.get("beta_slow", 1.0)),
        )
    return none


def release_block_size(raw: dict) -> int:
    """The FP8 block of a release config's quantization_config (128 when there is none)."""
    quant = raw.get("quantization_config") or {}
    if not quant:
        return 128
    method, fmt = quant.get("quant_method"), quant.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise ValueError(
            f"config.json: quantization_config quant_method={method!r} fmt={fmt!r} is not DeepSeek's release "
            "format (quant_method 'fp8', fmt 'e4m3', with FP4 experts); dequantize it to bf16/fp32 first."
        )
    block = quant.get("weight_block_size", [128, 128])
    if len(block) != 2 or block[0] != block[1]:
        raise ValueError(f"config.json: quantization_config weight_block_size={block} is not a square block.")
    return int(block[0])


def model_config_from_hf(raw: dict) -> ModelConfig:
    """Map an HF / official DeepSeek-V4 config.json dict onto our ModelConfig."""
    release_block_size(raw)  # refuses an unknown quantisation method up front
    num_layers = int(_first(raw, "num_hidden_layers", "n_layers"))
    mtp_layers = int(_first(raw, "num_nextn_predict_layers", "n_mtp_layers", default=0))
    head_dim = int(_first(raw, "head_dim", default=512))
    rope_dim = _first(raw, "qk_rope_head_dim", "rope_head_dim")
    if rope_dim is None:
        rope_dim = int(round(head_dim * float(raw.get("partial_rotary_factor", 64 / 512))))
    main_theta = raw.get("rope_theta", 10000.0)
    rope_parameters = raw.get("rope_parameters")
    if isinstance(rope_parameters, dict) and isinstance(rope_parameters.get("main"), dict):
        main_theta = rope_parameters["main"].get("rope_theta", main_theta)
    compress_theta = raw.get("compress_rope_theta", 160000.0)
    if isinstance(rope_parameters, dict) and isinstance(rope_parameters.get("compress"), dict):
        compress_theta = rope_parameters["compress"].get("rope_theta", compress_theta)
    score = _first(raw, "scoring_func", "score_func", default="sqrtsoftplus")
    return ModelConfig(
        name=str(raw.get("model_type", "deepseek_v4")),
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(_first(raw, "hidden_size", "dim")),
        num_layers=num_layers,
        num_attention_heads=int(_first(raw, "num_attention_heads", "n_heads")),
        head_dim=head_dim,
        qk_rope_head_dim=int(rope_dim),
        q_lora_rank=int(raw["q_lora_rank"]),
        o_groups=int(raw["o_groups"]),
        o_lora_rank=int(raw["o_lora_rank"]),
        sliding_window=int(_first(raw, "sliding_window", "window_size")),
        compress_ratios=_compress_ratios(raw, num_layers, mtp_layers),
        rope_theta=float(main_theta),
        compress_rope_theta=float(compress_theta),
        yarn=_yarn(raw),
        max_position_embeddings=int(raw.get("max_position_embeddings", 1048576)),
        index_n_heads=int(raw["index_n_heads"]),
        index_head_dim=int(raw["index_head_dim"]),
        index_topk=int(raw["index_topk"]),
        hc_mult=int(raw.get("hc_mult", 4)),
        hc_sinkhorn_iters=int(raw.get("hc_sinkhorn_iters", 20)),
        hc_eps=float(raw.get("hc_eps", 1e-6)),
        num_hash_layers=_num_hash_layers(raw),
        num_routed_experts=int(_first(raw, "n_routed_experts")),
        num_shared_experts=int(raw.get("n_shared_experts", 1)),
        num_experts_per_tok=int(_first(raw, "num_experts_per_tok", "n_activated_experts")),
        moe_intermediate_size=int(_first(raw, "moe_intermediate_size", "moe_inter_dim")),
        routed_scaling_factor=float(_first(raw, "routed_scaling_factor", "route_scale", default=1.0)),
        score_function=str(score),
        norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
        swiglu_limit=float(raw.get("swiglu_limit", 10.0)),
        mtp_num_layers=mtp_layers,
        rms_norm_eps=float(_first(raw, "rms_norm_eps", "norm_eps", default=1e-6)),
        init_std=float(raw.get("initializer_range", 0.02)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


_RATIO_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention"}


def hf_config_from_model(model_cfg: ModelConfig) -> dict:
    """transformers' `DeepseekV4Config` dict for our ModelConfig (the inverse of model_config_from_hf;
    `compress_ratios`, the release's key, is written too since it also covers the MTP layers)."""
    m = model_cfg
    main = m.compress_ratios[:m.num_layers]
    hca = sorted({r for r in m.compress_ratios if r not in _RATIO_LAYER_TYPE})
    if len(hca) > 1:
        raise ValueError(f"model.compress_ratios has several HCA ratios {hca}; transformers' config holds one.")
    partial = m.qk_rope_head_dim / m.head_dim
    compress = {"rope_theta": m.compress_rope_theta, "rope_type": "default", "partial_rotary_factor": partial}
    if m.yarn.factor != 1.0 or m.yarn.original_max_position_embeddings:
        compress.update(rope_type="yarn", factor=m.yarn.factor, attention_factor=1.0,
                        original_max_position_embeddings=m.yarn.original_max_position_embeddings,
                        beta_fast=m.yarn.beta_fast, beta_slow=m.yarn.beta_slow)
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": 1, "head_dim": m.head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim, "partial_rotary_factor": partial, "q_lora_rank": m.q_lora_rank,
        "o_groups": m.o_groups, "o_lora_rank": m.o_lora_rank, "sliding_window": m.sliding_window,
        "layer_types": [_RATIO_LAYER_TYPE.get(r, "heavily_compressed_attention") for r in main],
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128},
        "compress_ratios": list(m.compress_ratios),
        "rope_theta": m.rope_theta, "compress_rope_theta": m.compress_rope_theta,
        "rope_parameters": {"main": {"rope_theta": m.rope_theta, "rope_type": "default", "partial_rotary_factor": partial},
                            "compress": compress},
        "max_position_embeddings": m.max_position_embeddings,
        "index_n_heads": m.index_n_heads, "index_head_dim": m.index_head_dim, "index_topk": m.index_topk,
        "hc_mult": m.hc_mult, "hc_sinkhorn_iters": m.hc_sinkhorn_iters, "hc_eps": m.hc_eps,
        "mlp_layer_types": ["hash_moe" if i < m.num_hash_layers else "moe" for i in range(m.num_layers)],
        "n_routed_experts": m.num_routed_experts, "n_shared_experts": m.num_shared_experts,
        "num_experts_per_tok": m.num_experts_per_tok, "moe_intermediate_size": m.moe_intermediate_size,
        "routed_scaling_factor": m.routed_scaling_factor, "scoring_func": m.score_function,
        "norm_topk_prob": m.norm_topk_prob, "swiglu_limit": m.swiglu_limit, "hidden_act": "silu",
        "num_nextn_predict_layers": m.mtp_num_layers, "rms_norm_eps": m.rms_norm_eps,
        "initializer_range": m.init_std, "tie_word_embeddings": m.tie_word_embeddings,
        "attention_bias": False, "mlp_bias": False,
    }


def hf_name(native: str) -> str:
    """transformers' `save_pretrained` name of a native tensor name (the inverse of native_name)."""
    special = {"embed.weight": "model.embed_tokens.weight", "head.weight": "head.weight"}
    if native in special:
        return special[native]
    match = re.match(r"^hc_head_(fn|base|scale)$", native)
    if match:
        return f"model.hc_head.hc_{match[1]}"
    return "model." + re.sub(r"^((?:layers|mtp)\.\d+\.attn)\.kv_norm\.weight$", r"\1.norm.weight", native)


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------
def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json.")
    tensors: Dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(path, shard)))
    return tensors


_HF_RENAMES = [
    (re.compile(r"^embed_tokens\.weight$"), "embed.weight"),
    (re.compile(r"^lm_head\.weight$"), "head.weight"),
    (re.compile(r"^hc_head\.hc_(fn|base|scale)$"), r"hc_head_\1"),
    (re.compile(r"^((?:layers|mtp)\.\d+\.attn)\.norm\.weight$"), r"\1.kv_norm.weight"),
]


def native_name(name: str) -> str:
    """DeepSeek's native name of a tensor saved under either naming (native names pass unchanged)."""
    if name.startswith("model."):
        name = name[len("model."):]
    for pattern, replacement in _HF_RENAMES:
        name = pattern.sub(replacement, name)
    return name


def to_native_names(tensors: Dict[str, torch.Tensor], *, block: int = 128, report: Optional[dict] = None
                    ) -> Dict[str, torch.Tensor]:
    """Map transformers-saved names onto DeepSeek's native ones (native names pass unchanged) and
    dequantise the release's FP8 / FP4 weights (bridge/release_format.py); `report` receives the
    names dequantised per format."""
    out = {}
    for name, tensor in tensors.items():
        name = native_name(name)
        if name in out:
            raise ValueError(f"checkpoint holds tensor {name!r} twice (under two naming schemes).")
        out[name] = tensor
    out, dequantized = dequantize(out, block=block)
    if report is not None:
        report.update(dequantized)
    return out


_BLOCK_RULES = [
    (re.compile(r"^hc_(attn|ffn)\.(fn|base|scale)$"), lambda m: [f"hc_{m[1]}_{m[2]}"]),
    (re.compile(r"^ffn\.router\.weight$"), lambda m: ["ffn.gate.weight"]),
    (re.compile(r"^ffn\.router\.expert_bias$"), lambda m: ["ffn.gate.bias"]),
    (re.compile(r"^ffn\.router\.tid2eid$"), lambda m: ["ffn.gate.tid2eid"]),
    (re.compile(r"^ffn\.experts\.local_experts\.(\d+)\.linear_fc1\.weight$"),
     lambda m: [f"ffn.experts.{m[1]}.w1.weight", f"ffn.experts.{m[1]}.w3.weight"]),
    (re.compile(r"^ffn\.experts\.local_experts\.(\d+)\.linear_fc2\.weight$"), lambda m: [f"ffn.experts.{m[1]}.w2.weight"]),
    (re.compile(r"^ffn\.shared_experts\.linear_fc1\.weight$"),
     lambda m: ["ffn.shared_experts.w1.weight", "ffn.shared_experts.w3.weight"]),
    (re.compile(r"^ffn\.shared_experts\.linear_fc2\.weight$"), lambda m: ["ffn.shared_experts.w2.weight"]),
    (re.compile(r"^(attn_norm\.weight|ffn_norm\.weight|attn\..+)$"), lambda m: [m[1]]),
]
_MTP_RULES = [
    (re.compile(r"^(e_proj|h_proj|enorm|hnorm|norm)\.weight$"), lambda m: [f"{m[1]}.weight"]),
    (re.compile(r"^hc_head\.(fn|base|scale)$"), lambda m: [f"hc_head_{m[1]}"]),
]


def _block_sources(rest: str) -> Optional[List[str]]:
    for pattern, make in _BLOCK_RULES:
        match = pattern.match(rest)
        if match:
            return make(match)
    return None


def native_sources(name: str) -> Optional[List[str]]:
    """Native tensor names that make up our parameter/buffer `name` (concatenated along dim 0).

    Expert indices are global = local here (load_hf builds a single-process model).
    """
    top = {
        "embedding.word_embeddings.weight": ["embed.weight"],
        "output_layer.weight": ["head.weight"],
        "norm.weight": ["norm.weight"],
        "hc_head.fn": ["hc_head_fn"],
        "hc_head.base": ["hc_head_base"],
        "hc_head.scale": ["hc_head_scale"],
    }
    if name in top:
        return top[name]
    match = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if match:
        sources = _block_sources(match[2])
        return None if sources is None else [f"layers.{match[1]}.{s}" for s in sources]
    match = re.match(r"^mtp\.(\d+)\.(.+)$", name)
    if match:
        depth, rest = match[1], match[2]
        for pattern, make in _MTP_RULES:
            inner = pattern.match(rest)
            if inner:
                return [f"mtp.{depth}.{s}" for s in make(inner)]
        if rest.startswith("block."):
            sources = _block_sources(rest[len("block."):])
            return None if sources is None else [f"mtp.{depth}.{s}" for s in sources]
    return None


def _check_hash_table(name: str, table: torch.Tensor, *, vocab: int, experts: int, topk: int) -> None:
    if tuple(table.shape) != (vocab, topk):
        raise ValueError(f"{name} has shape {tuple(table.shape)}; expected [vocab_size, num_experts_per_tok] = [{vocab}, {topk}].")
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= experts):
        raise ValueError(f"{name} holds expert ids outside [0, {experts}).")
    sorted_rows = table.sort(dim=1).values
    if bool((sorted_rows[:, 1:] == sorted_rows[:, :-1]).any()):
        raise ValueError(
            f"{name} routes some token to the same expert twice (e.g. an untrained all-zero table, as "
            "transformers initialises it); a released V4 table has distinct experts per token."
        )


def mapping_problems(*, unmapped: List[str], missing: List[str], unknown: List[str], mismatched: List[str],
                     limit: Optional[int] = None) -> List[str]:
    """How a checkpoint fails to fit the model, one phrase per kind (at most `limit` names each)."""
    def names(items):
        items = sorted(items)
        return items if limit is None or len(items) <= limit else items[:limit] + ["..."]

    kinds = [("model tensors without a checkpoint mapping (bridge bug)", unmapped), ("missing in the checkpoint", missing),
             ("in the checkpoint but unused by the model", unknown), ("shape mismatches", mismatched)]
    return [f"{label}: {names(items)}" for label, items in kinds if items]


def load_state_into(model, tensors: Dict[str, torch.Tensor]) -> dict:
    """Copy native-named `tensors` into `model`; returns the import report."""
    cfg = model.model_cfg
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    used, missing, mismatched, unmapped = set(), [], [], []
    mtp_missing = []
    new_state = {}
    for name, current in state.items():
        sources = native_sources(name)
        if sources is None:
            unmapped.append(name)
            continue
        absent = [s for s in sources if s not in tensors]
        if absent:
            (mtp_missing if name.startswith("mtp.") else missing).extend(absent)
            continue
        used.update(sources)
        value = torch.cat([tensors[s] for s in sources], dim=0) if len(sources) > 1 else tensors[sources[0]]
        if tuple(value.shape) != tuple(current.shape):
            mismatched.append(f"{'+'.join(sources)}: checkpoint {tuple(value.shape)} vs model {tuple(current.shape)}")
            continue
        if name.endswith("tid2eid"):
            _check_hash_table(sources[0], value, vocab=cfg.vocab_size, experts=cfg.num_routed_experts, topk=cfg.num_experts_per_tok)
        new_state[name] = value.to(current.dtype)
    unknown = sorted(set(tensors) - used - set(mtp_missing))
    problems = mapping_problems(unmapped=unmapped, missing=missing, unknown=unknown, mismatched=mismatched)
    if problems:
        raise ValueError("Cannot import the checkpoint into DSV4Model. " + " | ".join(problems))
    result = model.load_state_dict(new_state, strict=False)
    leftover = [k for k in result.missing_keys if not k.endswith("_extra_state") and not k.startswith("mtp.")]
    assert not leftover and not result.unexpected_keys, (leftover, result.unexpected_keys)
    report = {"loaded": sorted(new_state), "mtp_initialised": sorted(mtp_missing)}
    if mtp_missing:
        warnings.warn(
            f"The checkpoint has no MTP weights ({len(mtp_missing)} tensors, e.g. {sorted(mtp_missing)[:2]}); "
            "the MTP block keeps its fresh initialisation (transformers' DeepseekV4 does not implement MTP).",
            stacklevel=2,
        )
    return report


def _ensure_runtime(seed: int) -> None:
    from dsv4_train.mcore import cpu_compat

    cpu_compat.apply()
    from megatron.core import parallel_state

    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        # The import maps checkpoint tensors 1:1 onto this process's parameters (expert e is local
        # expert e, no TP split), which only holds for a process that owns the whole model.
        sizes = {
            "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "ep": parallel_state.get_expert_model_parallel_world_size(),
            "cp": parallel_state.get_context_parallel_world_size(),
        }
        split = {name: size for name, size in sizes.items() if size > 1}
        if split:
            raise ValueError(
                f"load_hf builds a whole, single-process model but this process holds a parallel layout "
                f"{split}; import the HF checkpoint in one process, save it as a dsv4-train checkpoint "
                "(dsv4_train.checkpoint.io.save_checkpoint), and load that in the parallel layout "
                "(checkpoint.load=<dir> checkpoint.load_model_only=true), which reshards TP/EP/PP/CP."
            )
        return
    from dsv4_train.runtime.distributed import init_single_process_for_tools

    init_single_process_for_tools(seed=seed)


def load_hf(path: str, *, precision: str = "fp32", seed: int = 1234, moe_expert_compute: str = "auto"):
    """Build a single-process `DSV4Model` from an HF checkpoint directory; returns it in eval mode.

    `model(input_ids)` -> logits [b, s, vocab]. Packed documents: `model(input_ids, segment_ids=...)`
    with `segment_ids` [b, s] integers, equal ids = one document, non-decreasing along the sequence;
    each document then attends to and is compressed within itself and restarts its RoPE positions,
    so its logits are those of the document run alone (model/documents.py;
    tests/bridge/test_hf_import.py). Initialises gloo world 1 + Megatron parallel state (+ the CPU
    compatibility layer) when not done yet. `moe_expert_compute`: see ModelConfig.
    """
    with open(os.path.join(path, "config.json")) as handle:
        raw = json.load(handle)
    model_cfg = model_config_from_hf(raw)
    model_cfg.moe_expert_compute = moe_expert_compute
    dequantized: dict = {}
    tensors = to_native_names(read_safetensors(path), block=release_block_size(raw), report=dequantized)
    _ensure_runtime(seed)

    from dsv4_train.model.builder import build_model
    from dsv4_train.model.transformer_config import build_transformer_config

    config = build_transformer_config(model_cfg=model_cfg, precision=precision)
    model = build_model(model_cfg=model_cfg, transformer_config=config)
    model.hf_import_report = load_state_into(model, tensors)
    model.hf_import_report.update({f"dequantized_{kind}": names for kind, names in dequantized.items()})
    return model.eval()
