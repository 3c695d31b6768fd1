"""Did the adapter help? Held-out loss and perplexity of the base model and of base + adapter, on the same split."""

import math

import torch
from torch.utils.data import DataLoader

from .data import IGNORE_INDEX, Collator


@torch.no_grad()
def held_out_loss(model, eval_set, tokenizer, batch_size: int) -> float:
    """Mean next-token loss per predicted token (padding excluded), over the whole set: the model's own loss summed
    (`num_items_in_batch=1`), so the chunked loss (finetune/chunked_loss.py) keeps long examples' logits small."""
    model.eval()
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in DataLoader(eval_set, batch_size=batch_size, collate_fn=Collator(tokenizer)):
        batch = {key: value.to(device) for key, value in batch.items()}
        total += model(**batch, num_items_in_batch=1).loss.item()
        tokens += (batch["labels"][:, 1:] != IGNORE_INDEX).sum().item()
    if not tokens:
        raise ValueError("no held-out token to evaluate")  # the callers' check_labels refuses such a set first
    return total / tokens


def compare(model, eval_set, tokenizer, batch_size: int) -> dict[str, float]:
    """Base (the adapter disabled) and base + adapter on the same examples: `base_loss`, `base_perplexity`,
    `adapter_loss`, `adapter_perplexity`."""
    with model.disable_adapter():
        base = held_out_loss(model, eval_set, tokenizer, batch_size)
    adapted = held_out_loss(model, eval_set, tokenizer, batch_size)
    return {"base_loss": base, "base_perplexity": math.exp(base),
            "adapter_loss": adapted, "adapter_perplexity": math.exp(adapted)}


def describe(comparison: dict[str, float], examples: int) -> str:
    return (f"held-out loss over {examples} example{'s' * (examples != 1)}: base {comparison['base_loss']:.4f} "
            f"(perplexity {comparison['base_perplexity']:.4g}) -> base + adapter {comparison['adapter_loss']:.4f} "
            f"(perplexity {comparison['adapter_perplexity']:.4g})")
