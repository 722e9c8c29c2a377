"""MTP (paper §2.1, §4.2.2): the injected loss equals CE of the MTP head on tokens t+2, the MTP layer is the
spec's composition, and `set_mtp_loss_weight` scales its gradient at run time without touching
the returned LM loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from v4_model_helpers import build_tiny, tokens


def _mtp_tracker_value():
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    return MTPLossLoggingHelper.tracker["loss_values"][0].item()


def _capture(module, store, key):
    def hook(mod, inputs, output):
        store[key] = output  # keeps autograd history; returns None so the output is unchanged

    return module.register_forward_hook(hook)


def test_mtp_loss_matches_direct_computation(megatron_world1):
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    model = build_tiny(seed=0, seq_aux_loss_coeff=0.0).train()
    cfg = model.model_cfg
    ids = tokens(cfg)
    b, s = ids.shape
    labels = torch.roll(ids, -1, dims=1)
    loss_mask = torch.ones(b, s)
    loss_mask[:, -1] = 0  # the last position has no next token
    seen = {}
    hooks = [_capture(model.layers[-1], seen, "streams"), _capture(model.mtp[0], seen, "mtp")]
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    with torch.no_grad():
        model(ids, labels=labels, loss_mask=loss_mask)
    for h in hooks:
        h.remove()

    # Direct spec composition from the main model's last-layer streams X [s, b, n, d].
    mtp = model.mtp[0]
    streams = seen["streams"]
    shifted = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)  # token t+1 at t
    with torch.no_grad():
        e = mtp.enorm(model.embedding.word_embeddings(shifted).transpose(0, 1))
        x = mtp.e_proj.weight @ e.unsqueeze(-1)  # [s, b, d, 1]
        x = x.squeeze(-1).unsqueeze(-2) + mtp.hnorm(streams) @ mtp.h_proj.weight.t()
        x = mtp.block(x, token_ids=shifted.t())
        hidden = mtp.norm(mtp.hc_head(x))
        logits = (hidden @ model.output_layer.weight.t()).transpose(0, 1)  # [b, s, V]
    # fp32, same ops up to matmul association: 1e-5 on O(1) activations.
    assert (hidden - seen["mtp"][0]).abs().max().item() <= 1e-5
    # Targets t+2 exist for t <= s-3 (the mask rolled once more drops position s-2).
    ce = F.cross_entropy(logits[:, : s - 2].reshape(-1, cfg.vocab_size), ids[:, 2:].reshape(-1))
    # Loss values ~6 in fp32 through the same logits: 1e-5 absolute.
    assert abs(_mtp_tracker_value() - ce.item()) <= 1e-5


def test_mtp_weight_scales_gradient_not_reported_loss(megatron_world1):
    model = build_tiny(seed=0, seq_aux_loss_coeff=0.0).train()
    ids = tokens(model.model_cfg)
    labels = torch.roll(ids, -1, dims=1)
    grads, losses = {}, {}
    for weight in (0.0, 0.1, 0.3):
        model.set_mtp_loss_weight(weight)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels)
        losses[weight] = loss.detach()
        loss.mean().backward()
        grads[weight] = model.mtp[0].e_proj.weight.grad
    assert grads[0.0] is None or grads[0.0].abs().max().item() == 0.0
    assert grads[0.1].abs().max().item() > 0
    # The MTP-only parameter's gradient is linear in the weight; fp32 rounding of the two backward
    # passes differs by a few ulps, so compare against the largest entry (1e-5 of it).
    scale = grads[0.3].abs().max().item()
    assert (grads[0.3] - 3.0 * grads[0.1]).abs().max().item() <= 1e-5 * scale
    # The returned per-token loss is the LM loss only: identical whatever the MTP weight.
    assert torch.equal(losses[0.0], losses[0.3])
