"""Attention that keeps packed examples apart, registered with transformers as `per_example`.

On a GPU with FlashAttention kernels (compute capability 8.0+), packed batches run through PyTorch's variable-length
FlashAttention (the kernels of `torch.nn.attention.varlen`), which treats each example as its own causal sequence: as
fast as causal attention over whole blocks (bench/attention_kernels.py: 1.62 against 1.72 ms a layer at StarCoder-15B's
shape; an SDPA document mask takes 4.9 ms and compiled flex attention 2.8). Everywhere else (the CPU, evaluation,
generation) it is transformers' SDPA attention, which builds the same per-example mask from the position ids.
Grouped-query and multi-query key/value heads go to the kernel as they are, and a sliding window (StarCoder2's 4,096
tokens) limits each token to the `window` positions up to itself in both: FlashAttention's left window is `window - 1`,
the positions before the token itself, where transformers' mask keeps `key > query - window`. Neither kernel applies
attention dropout, so `use` turns it off.
"""

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "per_example"


@functools.cache
def flash_available() -> bool:
    """Whether PyTorch's FlashAttention kernels run here (a CUDA GPU of compute capability 8.0 or newer)."""
    return (torch.cuda.is_available() and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability() >= (8, 0))


class _PackedFlashAttention(torch.autograd.Function):
    """Causal FlashAttention over each packed example, as PyTorch's own variable-length kernels (the aten ops behind
    torch.nn.attention.varlen.varlen_attn). Called directly because varlen_attn wraps them in Python custom ops whose
    dispatch cost the CPU 1.2 ms a layer in the backward, more than the kernel's 1.0 ms on the GPU (FP8 step profile,
    H200, docs/PERFORMANCE.md 2026-12-06): time the GPU then spends waiting."""

    @staticmethod
    def forward(ctx, query, key, value, cu_lengths, longest: int, scale, window_left: int):
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            query, key, value, cu_lengths, cu_lengths, longest, longest, 0.0, True, False, scale=scale,
            window_size_left=window_left, window_size_right=0)
        ctx.save_for_backward(query, key, value, out, lse, cu_lengths, seed, offset)
        ctx.longest, ctx.scale, ctx.window_left = longest, scale, window_left
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, cu_lengths, seed, offset = ctx.saved_tensors
        grads = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), query, key, value, out, lse, cu_lengths, cu_lengths, ctx.longest, ctx.longest, 0.0,
            True, seed, offset, scale=ctx.scale, window_size_left=ctx.window_left, window_size_right=0)
        return *grads, None, None, None, None


def per_example_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          cu_seq_lens_q=None, max_length_q=None, sliding_window=None, **kwargs):
    # FlashAttention takes 16-bit inputs only; under autocast with fp32 norms (--fp32_upcast) q, k and v are fp32,
    # and a custom op is not cast by autocast as SDPA is.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if cu_seq_lens_q is None or not (query.is_cuda and flash_available()) or dtype not in (torch.float16,
                                                                                        torch.bfloat16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)  # the mask holds the window
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    batch, heads, length, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    window_left = sliding_window - 1 if sliding_window else -1  # causal, within the window if there is one
    out = _PackedFlashAttention.apply(*flat, cu_seq_lens_q, max_length_q, scaling, window_left)
    return out.view(batch, length, heads, dim), None


AttentionInterface.register(NAME, per_example_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def use(model) -> None:
    """Switch a transformers model to per-example attention, without attention dropout: in its config and in the
    attention layers that keep their own copy of the rate (GPTBigCode's `attn_dropout`, Llama's
    `attention_dropout`)."""
    model.set_attn_implementation(NAME)
    for owner in [model.config, *model.modules()]:
        for name in ("attn_pdrop", "attn_dropout", "attention_dropout"):
            if isinstance(getattr(owner, name, None), float):
                setattr(owner, name, 0.0)
