"""The LM head and the cross-entropy in chunks of tokens, so a training step never holds every logit at once.

At 8 x 2048 tokens and StarCoder's 49,152-token vocabulary the logits are 1.6 GB in bf16, and the loss makes an fp32
copy, its softmax and their gradients: several GB and a dozen memory-bound passes. Here each chunk's logits live
only while its loss and its input gradient are computed, in the forward; the backward just scales the saved input
gradient. Evaluation (no gradient) takes the same chunks, so a 16,384-token held-out file never holds its 3 GB of
fp32 logits either. The head must be frozen (its weight gradient is never computed): LoRA does not adapt it by
default.
Liger-Kernel and cut-cross-entropy do the same inside a patched forward, but support no GPTBigCode.
"""

import functools
import types

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from .data import IGNORE_INDEX

# 512 x 49,152 fp32 logits = 0.1 GB at a time. Against 2,048: 0.6 GiB off `lean_fp8`'s peak at 1 x 2048 (11.0 to
# 10.4 GiB), `fp8` at 4 x 2048 as fast (issue 21; H100, 2026-12-07, docs/PERFORMANCE.md)
CHUNK_TOKENS = 512


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, labels, head, denominator):
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], CHUNK_TOKENS):
            piece = hidden[start : start + CHUNK_TOKENS].detach().requires_grad_()
            with torch.enable_grad():
                loss = F.cross_entropy(head(piece).float(), labels[start : start + CHUNK_TOKENS],
                                       ignore_index=IGNORE_INDEX, reduction="sum")
            (grad[start : start + CHUNK_TOKENS],) = torch.autograd.grad(loss, piece)
            total += loss.detach()
        ctx.save_for_backward(grad, denominator)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        grad, denominator = ctx.saved_tensors
        return grad * (grad_loss / denominator).to(grad.dtype), None, None, None


def causal_lm_loss(hidden, labels, head, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross-entropy of `hidden` (batch, tokens, width) through `head`, as transformers' causal LM loss:
    labels shifted left, -100 ignored, summed over `num_items_in_batch` (the Trainer's count across gradient
    accumulation) or else averaged over the predicted tokens."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1).to(hidden.device)
    denominator = num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE_INDEX).sum()
    denominator = torch.as_tensor(denominator, dtype=torch.float32, device=hidden.device).clamp(min=1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if not torch.is_grad_enabled():  # evaluation: no input gradient to keep
        pieces = [F.cross_entropy(head(hidden[start : start + CHUNK_TOKENS]).float(),
                                  shifted[start : start + CHUNK_TOKENS], ignore_index=IGNORE_INDEX, reduction="sum")
                  for start in range(0, hidden.shape[0], CHUNK_TOKENS)]
        return torch.stack(pieces).sum() / denominator
    return _ChunkedHeadLoss.apply(hidden, shifted, head, denominator)


def use(model) -> None:
    """Make `model` (a transformers causal LM) compute its loss in chunks: with labels its forward returns the loss
    and no logits, in training and in evaluation; generation (no labels) keeps the model's own forward."""
    original = model.forward

    @functools.wraps(type(model).forward)  # the Trainer reads the signature to keep the dataset's columns
    def forward(self, *args, **kwargs):
        if kwargs.get("labels") is None:
            return original(*args, **kwargs)
        labels, num_items_in_batch = kwargs.pop("labels"), kwargs.pop("num_items_in_batch", None)
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(loss=causal_lm_loss(hidden, labels, self.get_output_embeddings(),
                                                          num_items_in_batch))

    model.forward = types.MethodType(forward, model)
