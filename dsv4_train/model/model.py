"""The full DeepSeek-V4 language model on Megatron-Core's `LanguageModule` (spec §2, §9).

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

Pipeline parallelism is not implemented yet (issues to solve then: `set_input_tensor` must carry
the hc_mult streams across stage boundaries, and hash layers must sit on the first stage).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.multi_token_prediction import process_mtp_loss

from dsv4_train.config.model import ModelConfig
from dsv4_train.model.block import V4Block, rms_norm
from dsv4_train.model.mhc import HyperHead
from dsv4_train.model.mtp import MTPLayer


class DSV4Model(LanguageModule):
    def __init__(self, *, config, model_cfg: ModelConfig, pre_process: bool = True, post_process: bool = True):
        super().__init__(config=config)
        if config.pipeline_model_parallel_size != 1 or not (pre_process and post_process):
            raise NotImplementedError(
                "DSV4Model does not support pipeline parallelism yet; set parallel.pp=1."
            )
        self.model_cfg = model_cfg
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
        self.pre_process = pre_process
        self.post_process = post_process
        self.share_embeddings_and_output_weights = False  # V4: untied (spec §1.1)
        self.vocab_size = model_cfg.vocab_size
        self.hc_mult = model_cfg.hc_mult
        self.mtp_process = post_process and model_cfg.mtp_num_layers > 0
        self.input_tensor = None

        self.embedding = LanguageModelEmbedding(
            config=config,
            vocab_size=model_cfg.vocab_size,
            max_sequence_length=model_cfg.max_position_embeddings,
            position_embedding_type="none",  # RoPE lives inside the attention
            tp_group=self.pg_collection.tp,
        )
        self.layers = torch.nn.ModuleList(
            V4Block(config=config, model_cfg=model_cfg, layer_index=i) for i in range(model_cfg.num_layers)
        )
        self.hc_head = HyperHead(
            config=config, hc_mult=model_cfg.hc_mult, hc_eps=model_cfg.hc_eps, norm_eps=model_cfg.rms_norm_eps
        )
        self.norm = rms_norm(config, model_cfg)
        self.output_layer = tensor_parallel.ColumnParallelLinear(
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
            self.mtp = torch.nn.ModuleList(
                MTPLayer(config=config, model_cfg=model_cfg, depth=k) for k in range(model_cfg.mtp_num_layers)
            )
        self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        """Called by Megatron's schedules every step; only meaningful with PP (not supported yet)."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0] if input_tensor else None
        self.input_tensor = input_tensor

    def set_mtp_loss_weight(self, weight: float) -> None:
        """MTP loss weight lambda (0.3, then 0.1 from the start of LR decay, spec §9)."""
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
    ) -> torch.Tensor:
        positions = self._attention_positions(position_ids)
        token_ids = input_ids.t()  # [s, b], the layout of the hidden states (hash routing)
        embedded = self.embedding(input_ids=input_ids, position_ids=None)  # [s, b, d]
        streams = embedded.unsqueeze(-2).expand(-1, -1, self.hc_mult, -1).contiguous()  # [s, b, n, d]
        for layer in self.layers:
            streams = layer(streams, token_ids=token_ids, position_ids=positions)
        hidden = self.norm(self.hc_head(streams))  # [s, b, d]

        if labels is None:
            logits, _ = self.output_layer(hidden, runtime_gather_output=True)
            return logits.transpose(0, 1).contiguous()  # [b, s, V]

        if self.mtp_process:
            hidden = self._attach_mtp_loss(hidden, streams, input_ids, positions, labels, loss_mask)
        logits, _ = self.output_layer(hidden)
        return self.compute_language_model_loss(labels, logits)  # [b, s]

    def _attach_mtp_loss(self, hidden, streams, input_ids, positions, labels, loss_mask):
        """Run the MTP depths and let Megatron's `process_mtp_loss` inject their loss into the
        backward of `hidden` (returned unchanged in value)."""
        mtp_hidden = []
        mtp_streams, mtp_ids = streams, input_ids
        for layer in self.mtp:
            out, mtp_streams, mtp_ids = layer(
                streams=mtp_streams,
                input_ids=mtp_ids,
                embedding=self.embedding,
                position_ids=positions,
                cp_group=self.cp_group,
            )
            mtp_hidden.append(out)
        return process_mtp_loss(
            hidden_states=torch.cat([hidden] + mtp_hidden, dim=0),
            labels=labels,
            loss_mask=loss_mask,
            output_layer=self.output_layer,
            output_weight=None,
            runtime_gather_output=None,
            is_training=self.training,
            compute_language_model_loss=self.compute_language_model_loss,
            config=self.config,
            cp_group=self.cp_group,
            tp_group=self.tp_group,
        )
