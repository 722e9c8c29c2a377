"""Routed experts as one grouped GEMM per projection over all local experts (`moe_expert_compute:
grouped`, the default).

    tokens sorted by local expert (the dispatcher's order), rows per expert [E]
    -> torch._grouped_mm with the stacked fc1 [E, 2f, d]      (offsets = cumulative rows, int32)
    -> clamped SwiGLU x routing prob, one autograd node (model/swiglu.py, paper §2.1, §4.2.3)
    -> torch._grouped_mm with the stacked fc2 [E, d, f]       -> [tokens, d]

No per-expert Python loop, no host sync (the offsets stay on the device), no re-stacking: the
weights ARE stacked parameters, `fc1_weight` [local experts, 2f/etp, d] and `fc2_weight`
[local experts, d, f/etp]. Checkpoints keep `SequentialMLP`'s per-expert keys
(model/grouped_checkpoint.py), so a checkpoint moves between `grouped`, `sequential` and `batched`
and between EP / expert-TP layouts unchanged; the HF import sees the same per-expert state-dict keys.

Kernels: on CUDA sm90+ with bf16 operands `torch._grouped_mm` is one CUTLASS grouped GEMM with the
offsets read on the device; other dtypes / GPUs (fp32 included) and the CPU take PyTorch's fallback,
a loop of mm's that reads the offsets on the host (pytorch PRs #161407, #162059).

Maths = Megatron's `MLP.forward` on an expert (unfused GLU path, the prob scaling the activation
before fc2); expert linears never communicate (the token dispatcher does), as in `SequentialMLP`.
Weight attributes (`allreduce`, `tensor_model_parallel`, ...) are those of the expert linears, so
DDP puts them in the expert-parallel buffers. Init: each expert's slice is drawn with
`init_method` / `output_layer_init_method` like one expert linear (the random stream differs from
`SequentialMLP`'s, which draws its weights in another order).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from dsv4_train.model import grouped_checkpoint, recompute
from dsv4_train.model.swiglu import expert_activation

# torch._grouped_mm needs 16-byte-aligned row strides: 8 elements in bf16 (the narrowest dtype run).
_ALIGN_ELEMENTS = 8


def _contiguous_grad(tensor: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm's backward needs a contiguous output gradient (CPU kernel); make it so."""
    if tensor.requires_grad:
        tensor.register_hook(lambda grad: grad.contiguous())
    return tensor


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [N, in] (rows grouped by expert), weight [E, out, in], offsets [E] int32 -> [N, out]."""
    if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        # torch 2.13's fake-tensor rule for _grouped_mm accepts bf16 only (its CPU kernel takes any
        # float dtype): a compiled block (model.compile) runs the fp32 GEMM outside the graph.
        return _grouped_linear_outside_graph(x, weight, offsets)
    return _contiguous_grad(torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets))


@torch.compiler.disable
def _grouped_linear_outside_graph(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _contiguous_grad(torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets))


class GroupedExperts(MegatronModule):
    """Drop-in for `SequentialMLP` (same constructor and forward signature; `submodules` and
    `name` are accepted and unused: there are no per-expert modules). See the module doc."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, name=None):
        super().__init__(config=config)
        assert not (config.fp8 or config.fp4 or config.moe_apply_probs_on_input or config.add_bias_linear), (
            "GroupedExperts implements the bias-free, unquantised path V4 uses")
        assert config.gated_linear_unit, "V4 experts are gated (SwiGLU)"
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        tp = self.tp_group.size()
        ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
        assert ffn % tp == 0, (ffn, tp)
        local_ffn = ffn // tp
        for label, size in (("hidden_size", hidden), ("moe_ffn_hidden_size / expert TP", local_ffn)):
            if size % _ALIGN_ELEMENTS:
                raise ValueError(f"grouped experts need {label} ({size}) to be a multiple of {_ALIGN_ELEMENTS} "
                                 "(torch._grouped_mm's 16-byte strides); use model.moe_expert_compute=sequential")
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        make = lambda *shape: torch.nn.Parameter(torch.empty(*shape, dtype=config.params_dtype, device=device))
        self.fc1_weight = make(num_local_experts, 2 * local_ffn, hidden)
        self.fc2_weight = make(num_local_experts, hidden, local_ffn)
        if config.perform_initialization:
            self._initialize()
        expert_parallel = config.expert_model_parallel_size > 1
        for weight, dim, stride in ((self.fc1_weight, 1, 2), (self.fc2_weight, 2, 1)):
            # As the expert linears set them (Megatron's ColumnParallelLinear / RowParallelLinear).
            weight.allreduce = not expert_parallel
            weight.tensor_model_parallel = True
            weight.partition_dim = dim
            weight.partition_stride = stride

    @torch.no_grad()
    def _initialize(self) -> None:
        def draw():
            for weight, init in ((self.fc1_weight, self.config.init_method),
                                 (self.fc2_weight, self.config.output_layer_init_method)):
                for expert in weight:
                    init(expert)

        if self.config.use_cpu_initialization:
            draw()
        else:
            from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

            with get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()):
                draw()

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """permuted_local_hidden_states [N, d] grouped by local expert, tokens_per_expert [E] (any
        device), permuted_probs [N] -> ([N, d], None)."""
        hidden = permuted_local_hidden_states
        if hidden.shape[0] == 0:
            # No rows here (e.g. an EP rank nobody routed to): zero output, zero weight gradients
            # (every weight stays in the graph, as SequentialMLP's empty matmuls keep them).
            zero = (self.fc1_weight.sum() + self.fc2_weight.sum() + permuted_probs.sum()) * 0.0
            return hidden * 0.0 + zero.to(hidden.dtype), None
        offsets = torch.cumsum(tokens_per_expert.to(device=hidden.device), 0).to(torch.int32)
        gate_up = grouped_linear(hidden, self.fc1_weight, offsets)  # [N, 2f]
        intermediate, dropped = recompute.run_dropping_outputs(
            recompute.active(self.config, "moe_act"), expert_activation(self.config), gate_up, permuted_probs
        )  # [N, f]
        output = grouped_linear(intermediate, self.fc2_weight, offsets)  # [N, d]
        recompute.release(dropped, output)
        return output, None

    # --- checkpoints: SequentialMLP's per-expert keys (model/grouped_checkpoint.py) ---------------
    def _global_experts(self):
        return self.ep_group.rank() * self.num_local_experts, self.ep_group.size() * self.num_local_experts

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        assert not metadata.get("singleton_local_shards", False), "singleton_local_shards is not supported"
        first, total = self._global_experts()
        sharded = {}
        for name, (linear, tp_axis) in grouped_checkpoint.PROJECTIONS.items():
            sharded[f"{prefix}{name}"] = grouped_checkpoint.expert_weight_factory(
                getattr(self, name), key=f"{prefix}experts.{linear}.weight", linear=linear, tp_axis=tp_axis,
                sharded_offsets=sharded_offsets, first_expert=first, num_global_experts=total,
                glu=linear == "linear_fc1", tp_group=self.tp_group, dp_rank=self.dp_group.rank())
            sharded.update(grouped_checkpoint.extra_state_objects(
                state_prefix=prefix, key_prefix=prefix, linear=linear, sharded_offsets=sharded_offsets,
                num_local_experts=self.num_local_experts, first_expert=first, num_global_experts=total,
                tp_rank=self.tp_group.rank(), dp_rank=self.dp_group.rank()))
        return sharded

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for i in range(self.num_local_experts):  # SequentialMLP's key order
            for name, (linear, _) in grouped_checkpoint.PROJECTIONS.items():
                weight = getattr(self, name)
                destination[f"{prefix}local_experts.{i}.{linear}.weight"] = (weight if keep_vars else weight.detach())[i]
                destination[f"{prefix}local_experts.{i}.{linear}._extra_state"] = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        grouped_checkpoint.stack_per_expert_keys(state_dict, prefix, self.num_local_experts, error_msgs.append)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def backward_dw(self):
        """Nothing deferred (MoELayer calls this with delayed weight-gradient computation)."""
