"""Did the adapter help? Held-out loss and perplexity of the base model and of base + adapter, on the same split; and,
for a run on code in fill-in-the-middle form, held-out infilling: a line of each held-out file to fill."""

import math
import random

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


def _infilling_examples(texts: list[str], tokenizer, fim_tokens, seq_length: int, seed: int) -> list[dict]:
    """One single-line infilling task per held-out file, drawn with `seed`: a non-blank line is the middle; the code
    around it, cut to fit `seq_length` with room for the line, is the prefix and suffix."""
    rng = random.Random(seed)
    tasks = []
    for text in texts:
        lines = text.splitlines(keepends=True)
        candidates = [i for i, line in enumerate(lines) if line.strip()]
        if not candidates:
            continue
        index = rng.choice(candidates)
        middle = tokenizer(lines[index], add_special_tokens=False)["input_ids"]
        room = max(0, seq_length - len(middle) - 8) // 2  # 8: the FIM tokens, leading special tokens, end of text
        prefix = tokenizer("".join(lines[:index]), add_special_tokens=False)["input_ids"][-room:] if room else []
        suffix = tokenizer("".join(lines[index + 1 :]), add_special_tokens=False)["input_ids"][:room]
        tasks.append({"prefix": tokenizer.decode(prefix), "suffix": tokenizer.decode(suffix), "middle": lines[index],
                      "middle_ids": middle})
    return tasks


@torch.no_grad()
def _infilling_scores(model, tokenizer, fim_tokens, tasks: list[dict]) -> tuple[float, float]:
    """Mean loss per middle token (end of text included) and the share of lines filled exactly."""
    from .inference import infill, infilling_ids

    device = next(model.parameters()).device
    total = tokens = exact = 0
    for task in tasks:
        context = infilling_ids(tokenizer, fim_tokens, task["prefix"], task["suffix"])
        target = [*task["middle_ids"], tokenizer.eos_token_id]
        ids = torch.tensor([context + target], device=device)
        labels = torch.tensor([[IGNORE_INDEX] * len(context) + target], device=device)
        total += model(input_ids=ids, labels=labels, num_items_in_batch=1).loss.item()
        tokens += len(target)
        filled = infill(model, tokenizer, fim_tokens, task["prefix"], task["suffix"], len(target) + 8, one_line=True)
        exact += filled.rstrip("\n") == task["middle"].rstrip("\n")
    return total / max(tokens, 1), exact / max(len(tasks), 1)


def compare_infilling(model, texts: list[str], tokenizer, fim_tokens, seq_length: int, seed: int) -> dict:
    """Held-out fill-in-the-middle, base (adapter disabled) and base + adapter on the same tasks: one line of each
    held-out file to fill, its loss and whether the greedy middle is exactly the line."""
    tasks = _infilling_examples(texts, tokenizer, fim_tokens, seq_length, seed)
    if not tasks:
        return {}
    with model.disable_adapter():
        base = _infilling_scores(model, tokenizer, fim_tokens, tasks)
    adapted = _infilling_scores(model, tokenizer, fim_tokens, tasks)
    return {"fim_examples": len(tasks), "fim_base_loss": base[0], "fim_adapter_loss": adapted[0],
            "fim_base_exact_match": base[1], "fim_adapter_exact_match": adapted[1]}
