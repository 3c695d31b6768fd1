"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"): the
objective StarCoder was pretrained with, and the form an editor asks for a completion in.

As bigcode's Megatron-LM and the personal-copilot recipe do it: each example (a packed block's fragment of one
file) is, with probability `rate`, cut at two uniformly random token positions into prefix, middle and suffix and
reordered as PSM, `<fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle`, or with probability `spm_rate` as
SPM, `<fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle`; an example's closing end-of-text token stays last,
so the model learns to stop after the middle. The three FIM tokens are paid for by cutting them off the suffix (as
Megatron's `truncate_or_pad`), so a packed block keeps its length and each example stays in its block, apart from
the others (per-example attention). The choices are drawn once, when the data is prepared, from the run's seed.
"""

import random
from dataclasses import dataclass

from .errors import UsageError

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips
# The FIM tokens' spellings: StarCoder, StarCoder2 and SantaCoder; Qwen2.5-Coder.
SPELLINGS = {"prefix": ("<fim_prefix>", "<|fim_prefix|>"), "middle": ("<fim_middle>", "<|fim_middle|>"),
             "suffix": ("<fim_suffix>", "<|fim_suffix|>")}
LOSSES = ("all", "middle")


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    middle: int
    suffix: int


@dataclass(frozen=True)
class Fim:
    """How a run turns examples into FIM form (--fim_rate, --fim_spm_rate, --fim_loss)."""
    tokens: FimTokens
    rate: float
    spm_rate: float
    middle_only: bool
    eos: int | None


DEFAULT_RATE = 0.5  # bigcode's StarCoder pretraining and the personal-copilot recipe


def find(tokenizer) -> FimTokens | None:
    """The tokenizer's FIM token ids, or None if it has none."""
    vocabulary = tokenizer.get_vocab()
    found = {role: next((vocabulary[s] for s in spellings if s in vocabulary), None)
             for role, spellings in SPELLINGS.items()}
    return None if None in found.values() else FimTokens(**found)


def tokens(tokenizer, model: str) -> FimTokens:
    """The tokenizer's FIM token ids; a tokenizer without them is refused."""
    found = find(tokenizer)
    if found is None:
        raise UsageError(f"{model!r}'s tokenizer has no fill-in-the-middle tokens ({', '.join(SPELLINGS['prefix'])} "
                         f"and the like): --fim_rate needs a model pretrained with FIM (StarCoder, StarCoder2, "
                         f"Qwen2.5-Coder); use --fim_rate 0")
    return found


def options(args, tokenizer, data_format: str) -> "Fim | None":
    """How this run turns examples into FIM form, or None: --fim_rate, by default DEFAULT_RATE for code (text data,
    source trees) when the tokenizer has FIM tokens. FIM has no prompt to mask, so it is refused for prompt/
    completion pairs and conversations, and for a tokenizer without the tokens."""
    rate = args.fim_rate
    if rate is None:
        rate = DEFAULT_RATE if data_format == "text" and find(tokenizer) else 0.0
    if not rate:
        return None
    if data_format != "text":
        raise UsageError(f"--fim_rate {rate:g} trains code in fill-in-the-middle form, and this data is "
                         f"{data_format.replace('_', ' ')} data; use text or a source tree, or --fim_rate 0")
    return Fim(tokens(tokenizer, args.model), rate, args.fim_spm_rate, args.fim_loss == "middle",
               tokenizer.eos_token_id)


def permute(ids: list[int], fim: Fim, rng: random.Random) -> tuple[list[int], list[int]]:
    """One example, with probability `fim.rate` in FIM form, as long as it was: (ids, labels). Labels are the ids,
    or with `middle_only` only the middle's and the end-of-text token's (an example left as it is trains whole). An
    example too short to give up three suffix tokens stays as it is."""
    if rng.random() >= fim.rate:
        return ids, list(ids)
    end = [fim.eos] if ids and ids[-1] == fim.eos else []
    body = ids[: len(ids) - len(end)]
    low, high = sorted(rng.randint(0, len(body)) for _ in range(2))
    prefix, middle, suffix = body[:low], body[low:high], body[high:]
    if len(suffix) < 3:
        return ids, list(ids)
    suffix = suffix[:-3]
    t = fim.tokens
    if rng.random() < fim.spm_rate:
        head = [t.prefix, t.suffix, *suffix, t.middle, *prefix]
    else:
        head = [t.prefix, *prefix, t.suffix, *suffix, t.middle]
    tail = middle + end
    return head + tail, ([IGNORE_INDEX] * len(head) if fim.middle_only else head) + tail
