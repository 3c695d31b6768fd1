"""Attention that keeps packed examples apart, registered with transformers as `per_example`.

On a GPU with FlashAttention kernels (compute capability 8.0+), packed batches run through PyTorch's variable-length
FlashAttention (`torch.nn.attention.varlen`), which treats each example as its own causal sequence: it is as fast as
causal attention over whole blocks (bench/attention_kernels.py: 1.62 against 1.72 ms a layer at StarCoder-15B's shape;
an SDPA document mask takes 4.9 ms and compiled flex attention 2.8). Everywhere else (the CPU, evaluation, generation)
it is transformers' SDPA attention, which builds the same per-example mask from the position ids. Grouped-query and
multi-query key/value heads go to the kernel as they are, and a sliding window (StarCoder2's 4,096 tokens) limits
each token to the `window` positions up to itself in both: FlashAttention's left window is `window - 1`, the
positions before the token itself, where transformers' mask keeps `key > query - window`. Neither kernel applies
attention dropout, so `use` turns it off.
"""

import functools
import importlib.util
import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "per_example"


@functools.cache
def _varlen():
    """PyTorch's variable-length FlashAttention with causal masking, or None where it cannot run. Its keywords
    differ between torch releases (enable_gqa arrived after 2.11)."""
    if not (torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen")
            and torch.cuda.get_device_capability() >= (8, 0)):
        return None
    from torch.nn.attention.varlen import varlen_attn

    options = {}
    if "enable_gqa" in inspect.signature(varlen_attn).parameters:
        options["enable_gqa"] = True  # fewer key/value heads than query heads (torch 2.11's kernel takes them anyway)
    return functools.partial(varlen_attn, **options)


def per_example_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          cu_seq_lens_q=None, max_length_q=None, sliding_window=None, **kwargs):
    varlen = _varlen()
    # FlashAttention takes 16-bit inputs only; under autocast with fp32 norms (--fp32_upcast) q, k and v are fp32,
    # and a custom op is not cast by autocast as SDPA is.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if cu_seq_lens_q is None or varlen is None or not query.is_cuda or dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)  # the mask holds the window
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    batch, heads, length, dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # causal, within the window if there is one
    out = varlen(*flat, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling, window_size=window)
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
