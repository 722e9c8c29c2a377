"""The full DeepSeek-V4 language model on Megatron-Core's `LanguageModule` (paper §2, §2.1).

From Megatron-Core: `LanguageModule` (embedding/output-layer setup, duplicated embedding on the MTP
stage kept in sync through the embedding group, vocab-parallel cross-entropy),
`LanguageModelEmbedding` (VocabParallelEmbedding), an untied `ColumnParallelLinear` output layer
and `process_mtp_loss`. Ours: the mHC stream expansion / contraction, V4 blocks and the V4 MTP layer.

Contract with the training loop:
    out = model(input_ids [b, s], position_ids [b, s] | None, labels [b, s] | None, loss_mask [b, s] | None)
    labels given -> per-token LM cross-entropy [b, s] (fp32); the MTP loss and the other aux losses
                    are injected into backward (MTPLossAutoScaler / MoEAuxLossAutoScaler), not added.
    labels None  -> logits [b, s, vocab] (gathered over TP).
    model.set_mtp_loss_weight(w)
Megatron layout inside: [s, b, ...]; the mHC residual is [s, b, hc_mult, d].

Pipeline parallelism: one DSV4Model per (pp rank, virtual stage), built from a `StageLayout`
(config/derive.py): it owns that stage's decoder layers (checkpoint keys use the global layer
index), the embedding on the first stage, hc_head / norm / output layer / MTP / loss on the last
stage (plus the duplicated MTP embedding kept in sync by `LanguageModule` through the embedding
group). The mHC residual crosses stage boundaries folded into the batch dimension:
[s, b, n, d] -> [s, b*n, d] (a free view), so Megatron's p2p shape (seq/cp [/tp], micro_batch,
hidden) holds with micro_batch := micro_batch * hc_mult (`pipeline_micro_batch_size`). Every stage
receives the micro-batch's token ids from the data (hash routing, MTP), so no stage depends on
another for them.

Context parallelism: inputs are this rank's contiguous slice (`dsv4_train/parallel/context.py`);
the attention exchanges a halo and the compressed entries; MTP shifts tokens across the slice
boundary and its loss is normalised by the CP-global token count (exact, unlike Megatron's
zigzag-aware `roll_tensor`, which is wrong for contiguous slices).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.multi_token_prediction import (
    MTPLossAutoScaler,
    MTPLossLoggingHelper,
    _compute_mtp_acceptance_counts,
)

from dsv4_train.config.model import ModelConfig
from dsv4_train.model.block import V4Block, rms_norm
from dsv4_train.model.documents import Documents
from dsv4_train.model.mhc import HyperHead
from dsv4_train.model.module_list import ShardedModuleList  # keeps TP/EP sharding in checkpoints
from dsv4_train.model.mtp import MTPLayer
from dsv4_train.model.parallel_linear import ColumnParallelLinear
from dsv4_train.parallel import context as cp_context
from dsv4_train.mcore.compute_context import model_compute


def pipeline_micro_batch_size(micro_batch_size: int, hc_mult: int) -> int:
    """The micro-batch size to give Megatron's schedule: the hc_mult streams ride in the batch dim."""
    return micro_batch_size * hc_mult


class DSV4Model(LanguageModule):
    def __init__(self, *, config, model_cfg: ModelConfig, pre_process: bool = True, post_process: bool = True,
                 stage=None):
        """stage: the `StageLayout` this chunk builds (required when pipeline-parallel); None builds
        the whole model (pre_process / post_process must then be True)."""
        super().__init__(config=config)
        if stage is None:
            if config.pipeline_model_parallel_size != 1 or not (pre_process and post_process):
                raise ValueError(
                    "DSV4Model with pipeline parallelism needs its stage: pass stage=derive(cfg).stage(pp_rank, "
                    "vpp_stage) (dsv4_train.train.loop.build_model_chunks does this)."
                )
            decoder_layers = list(range(model_cfg.num_layers))
            mtp_layers = list(range(model_cfg.mtp_num_layers))
        else:
            pre_process, post_process = stage.has_embedding, stage.has_loss
            decoder_layers, mtp_layers = list(stage.decoder_layers), list(stage.mtp_layers)
            assert not mtp_layers or post_process, "validate() keeps MTP layers on the loss stage"
            if (self.vp_size or 1) > 1:
                self.vp_stage = stage.vpp_stage  # read by LanguageModule's embedding-group logic
        self.model_cfg = model_cfg
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = False  # V4: untied (the released config.json, paper §4.2.1)
        self.vocab_size = model_cfg.vocab_size
        self.hc_mult = model_cfg.hc_mult
        self.mtp_process = post_process and bool(mtp_layers)
        self.input_tensor = None
        self.layer_indices = decoder_layers  # global index of each entry of self.layers
        self.cp_halo = cp_context.halo_size(model_cfg)

        if self.pre_process or self.mtp_process:
            self.embedding = LanguageModelEmbedding(
                config=config,
                vocab_size=model_cfg.vocab_size,
                max_sequence_length=model_cfg.max_position_embeddings,
                position_embedding_type="none",  # RoPE lives inside the attention
                tp_group=self.pg_collection.tp,
            )
        # Checkpoint keys use the global layer index (a stage's layers are contiguous).
        self.layers = ShardedModuleList(
            (V4Block(config=config, model_cfg=model_cfg, layer_index=i) for i in decoder_layers),
            key_offset=decoder_layers[0] if decoder_layers else 0,
        )
        if self.post_process:
            self.hc_head = HyperHead(
                config=config, hc_mult=model_cfg.hc_mult, hc_eps=model_cfg.hc_eps, norm_eps=model_cfg.rms_norm_eps
            )
            self.norm = rms_norm(config, model_cfg)
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                model_cfg.vocab_size,
                config=config,
                init_method=config.init_method,
                bias=False,
                skip_bias_add=False,
                gather_output=False,
                tp_group=self.pg_collection.tp,
            )
        if self.mtp_process:
            self.mtp = ShardedModuleList(
                (MTPLayer(config=config, model_cfg=model_cfg, depth=k) for k in mtp_layers), key_offset=mtp_layers[0]
            )
        self.setup_embeddings_and_output_layer()
        # The compression ratios this stage's attention layers use (their document blocks, see _forward).
        self._compress_ratios = sorted({m.attn.ratio for m in self.modules() if isinstance(m, V4Block)} - {0})

    def set_input_tensor(self, input_tensor) -> None:
        """Called by Megatron's schedules: the previous stage's streams folded to [s, b*n, d]."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.input_tensor = input_tensor

    track_mtp_in_eval = False  # set by train/evaluate.py while it evaluates (val_mtp_loss)

    def set_mtp_loss_weight(self, weight: float) -> None:
        """MTP loss weight lambda (0.3, then 0.1 from the start of LR decay, paper §2.1, §4.2.2)."""
        self.config.mtp_loss_scaling_factor = float(weight)

    @property
    def mtp_loss_weight(self) -> float:
        return float(self.config.mtp_loss_scaling_factor or 0.0)

    @staticmethod
    def _attention_positions(position_ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[b, s] -> [s]: the attention takes one position vector shared by the micro-batch."""
        if position_ids is None:
            return None
        if position_ids.dim() == 1:
            return position_ids
        if position_ids.shape[0] > 1 and not bool((position_ids == position_ids[:1]).all()):
            raise ValueError(
                "position_ids differ between sequences of one micro-batch; the V4 attention takes a "
                "single [s] position vector. Pass position_ids=None or identical rows."
            )
        return position_ids[0]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        loss_mask: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids / position_ids / labels / loss_mask: this CP rank's slice [b, s]. Every stage
        gets input_ids (hash routing, MTP); a non-last stage returns its folded streams.
        segment_ids [b, s]: packed documents (equal ids = one document, non-decreasing): each
        document attends to and is compressed within itself, RoPE restarts per document
        (model/documents.py); position_ids is then ignored."""
        with model_compute():  # no-op on GPU; skips the CPU layer's per-call hook
            return self._forward(input_ids, position_ids, labels, loss_mask, segment_ids)

    def _forward(self, input_ids, position_ids, labels, loss_mask, segment_ids=None) -> torch.Tensor:
        if segment_ids is not None:
            if segment_ids.shape != input_ids.shape:
                raise ValueError(
                    f"segment_ids has shape {tuple(segment_ids.shape)}; it must match input_ids {tuple(input_ids.shape)}."
                )
            position_ids = None
        positions = self._attention_positions(position_ids)
        batch, seq = input_ids.shape
        cp = None
        if self.cp_group is not None and self.cp_group.size() > 1:
            if positions is None:
                positions = torch.arange(seq, device=input_ids.device) + self.cp_group.rank() * seq
            cp = cp_context.build_slice(positions, group=self.cp_group, halo=self.cp_halo)
        documents = None
        if segment_ids is not None:
            segment_ids = segment_ids.to(input_ids.device)
            if cp is not None:  # the documents of the whole sequence; this rank's rows are a slice
                documents = Documents.from_segment_ids(
                    cp_context.gather_sequence(segment_ids, cp), offset=cp.offset, local_len=seq
                )
            else:
                documents = Documents.from_segment_ids(segment_ids)
            for ratio in self._compress_ratios:
                # Built here, once per micro-batch: a data-dependent host sync that must not sit
                # inside a compiled block (model.compile), where it would split the graph.
                documents.blocks(ratio)
        token_ids = input_ids.t()  # [s, b], the layout of the hidden states (hash routing)
        if self.pre_process:
            embedded = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, d]
            streams = embedded.unsqueeze(-2).expand(-1, -1, self.hc_mult, -1).contiguous()  # [s, b, n, d]
        else:
            received = self.input_tensor  # [s, b*n, d]
            streams = received.view(received.shape[0], batch, self.hc_mult, received.shape[-1])
        recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                # Full activation recompute: keep only each block's input streams; the block runs
                # again in backward (Megatron's checkpoint, RNG-tracker aware; the router counts tokens
                # for the expert-bias update only in the grad-enabled recompute, so once).
                streams = tensor_parallel.checkpoint(
                    lambda s, t, p, layer=layer: layer(s, token_ids=t, position_ids=p, cp=cp, documents=documents),
                    False, streams, token_ids, positions,
                )
            else:
                streams = layer(streams, token_ids=token_ids, position_ids=positions, cp=cp, documents=documents)
        if not self.post_process:
            return streams.view(streams.shape[0], batch * self.hc_mult, streams.shape[-1])
        hidden = self.norm(self.hc_head(streams))  # [s, b, d]

        if labels is None:
            logits, _ = self.output_layer(hidden, runtime_gather_output=True)
            return logits.transpose(0, 1).contiguous()  # [b, s, V]

        if self.mtp_process:
            hidden = self._attach_mtp_loss(hidden, streams, input_ids, positions, labels, loss_mask, cp, documents)
        logits, _ = self.output_layer(hidden)
        return self.compute_language_model_loss(labels, logits)  # [b, s]

    def _attach_mtp_loss(self, hidden, streams, input_ids, positions, labels, loss_mask, cp, documents=None):
        """Run the MTP depths and inject their loss into the backward of `hidden` (returned
        unchanged in value) through Megatron's `MTPLossAutoScaler`; log it in Megatron's tracker.

        Same loss as Megatron's `process_mtp_loss` (labels and mask shifted left once per depth,
        weight mtp_loss_scaling_factor / depths, normalised by the shifted mask's token count), but
        the shift crosses contiguous CP slices and the count is CP-global; each CP rank's share is
        scaled by cp like the LM loss (see parallel/context.py).
        """
        group = cp.group if cp is not None else None
        cp_size = cp.size if cp is not None else 1
        num_depths = len(self.mtp)
        weight = self.mtp_loss_weight / num_depths
        mtp_streams, mtp_ids, mtp_labels = streams, input_ids, labels
        mask = torch.ones_like(labels, dtype=torch.float32) if loss_mask is None else loss_mask.float()
        # Packed documents: depth k at position t reads token t+1+k, which must be in t's document.
        local_segments = None if documents is None else documents.segment_ids[:, documents.local] + 1
        shifted_segments = local_segments  # 0 = past the end
        for depth, layer in enumerate(self.mtp):
            keep = None
            if shifted_segments is not None:
                shifted_segments = cp_context.roll_left(shifted_segments, group)
                keep = (shifted_segments == local_segments).to(input_ids.dtype)
            out, mtp_streams, mtp_ids = layer(
                streams=mtp_streams, input_ids=mtp_ids, embedding=self.embedding, position_ids=positions, cp=cp,
                documents=documents, keep=keep,
            )
            logits, _ = self.output_layer(out)
            mtp_labels = cp_context.roll_left(mtp_labels, group)
            mask = cp_context.roll_left(mask, group)
            if keep is not None:
                mask = mask * keep
            local_sum = (self.compute_language_model_loss(mtp_labels, logits) * mask).sum()
            count = cp_context.sum_over(mask.sum(), cp).clamp(min=1)
            share = local_sum * cp_size / count
            if self.training or self.track_mtp_in_eval:  # training, or an evaluation (val_mtp_loss)
                correct, total = _compute_mtp_acceptance_counts(logits, mtp_labels, mask, self.output_layer, None, self.tp_group)
                MTPLossLoggingHelper.save_metrics_to_tracker(
                    share.detach(), correct, total, depth, num_depths,
                    avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
                )
            hidden = MTPLossAutoScaler.apply(hidden, weight * share)
        return hidden
