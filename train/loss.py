"""The causal-LM loss without the full logits tensor.

A small model's vocabulary projection is its largest activation: SmolLM2's 49,152-word head
turns a step of 8 x 256 tokens into 400 MB of logits, as much again for their softmax and their
gradient. On this CPU that made a 2,048-token step 15% slower per token than a 1,024-token one
(161.6-172.7 against 190.5-206.0 tokens/s), which is what length-grouped batches, being shorter,
gained over packing. Here the projection, the cross-entropy and the gradient with respect to the
hidden states are formed a chunk of positions at a time inside one autograd function (as fused
linear cross-entropy kernels do on GPUs), so only one chunk's logits exist at once and the
backward pass has nothing left to compute but a scale.
"""

from __future__ import annotations

import contextlib

import torch

from train.data import IGNORE

CHUNK = 1024  # positions per slice of logits: 200 MB in fp32 for a 49k vocabulary
# configuration keys of heads that do more than a linear projection (scaling or soft-capping the
# logits): their models take the plain loss
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE skipped), by chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int):
        labelled = targets != IGNORE
        count = labelled.sum().clamp(min=1)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for at in range(0, hidden.shape[0], chunk):
            keep = labelled[at:at + chunk]
            if not keep.any():
                continue
            h, t = hidden[at:at + chunk], targets[at:at + chunk].clamp(min=0)
            logits = (h @ weight.T).float()
            picked = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=-1)
            probs = logits.sub_(top[:, None]).exp_()  # in place: one chunk-sized buffer in all
            mass = probs.sum(dim=-1)
            total += ((mass.log() + top - picked) * keep).sum()
            if want_hidden or want_weight:
                probs.div_(mass[:, None])
                probs[torch.arange(len(t), device=t.device), t] -= 1
                if not keep.all():
                    probs[~keep] = 0
                probs = probs.to(hidden.dtype)
                if want_hidden:
                    grad_hidden[at:at + chunk] = probs @ weight
                if want_weight:
                    grad_weight += probs.T @ h
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype), None, None)


def _causal_lm(model):
    """The transformers model inside DDP and PEFT wrappers, or None where the head is not a
    plain linear projection."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # PEFT
        inner = inner.get_base_model()
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if any(getattr(inner.config, key, None) not in (None, 1, 1.0) for key in _HEAD_EXTRAS):
        return None
    return inner


@contextlib.contextmanager
def _hidden_states_as_logits(causal_lm):
    """The model's forward returns its last hidden states in place of logits, and yields its head."""
    head = causal_lm.get_output_embeddings()
    causal_lm.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        causal_lm.set_output_embeddings(head)


def supervised_loss(model, batch: dict):
    """The causal-LM loss (mean cross-entropy over labelled tokens).

    Assistant-only AFT masks leave most positions unlabelled: logits are computed only where some
    row is trained on. Dense batches (midtraining) project chunk by chunk (above). A sharded
    (FSDP) model, whose head weight is gathered only inside its own forward, and heads that are
    more than a projection take the model's own loss."""
    from torch.distributed.fsdp import FSDPModule

    labels = batch["labels"]
    targets = labels[:, 1:]  # the token at t + 1 is predicted at position t
    keep = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if keep.numel() == 0:  # nothing to learn from: the model's own loss (NaN) stops the loop in one line
        return model(**batch).loss
    if keep.numel() <= targets.shape[1] // 2:
        logits = model(**inputs, logits_to_keep=keep).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(),
                                                 ignore_index=IGNORE)
    causal_lm = None if isinstance(model, FSDPModule) else _causal_lm(model)
    if causal_lm is None:
        return model(**batch).loss
    with _hidden_states_as_logits(causal_lm) as head:
        hidden = model(**inputs).logits
    shifted = torch.nn.functional.pad(targets, (0, 1), value=IGNORE)
    return LinearCrossEntropy.apply(hidden.flatten(0, 1), head.weight, shifted.flatten(), CHUNK)
