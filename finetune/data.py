"""Data: load prompt/completion pairs, format them as StarCoder's fine-tune does, tokenize (packed or padded), split,
and batch."""

import hashlib
import os
from itertools import chain

import torch
from datasets import Dataset, load_dataset
from transformers import DataCollatorForSeq2Seq

from . import embedded
from .cli import LOCAL_DATA_FORMATS
from .errors import UsageError, first_line

# The format of bigcode/starcoder's own fine-tuning script (finetune/finetune.py, prepare_sample_text):
# "Question: {prompt}\n\nAnswer: {completion}". A prompt for generation stops before the space, which the
# byte-level BPE merges into the completion's first token ("Ġdef").
PROMPT_TEMPLATE = "Question: {prompt}\n\nAnswer:"
IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def _read(name: str, token: str | None) -> Dataset:
    extension = os.path.splitext(name)[1].lower()
    try:
        if extension in LOCAL_DATA_FORMATS:
            if not os.path.isfile(name):
                raise UsageError(f"dataset file {name!r} does not exist")
            if os.path.getsize(name) == 0:
                raise UsageError(f"dataset {name!r} is empty")
            return load_dataset(extension.lstrip(".").replace("jsonl", "json"), data_files=name, split="train")
        if os.path.exists(name):
            raise UsageError(f"dataset {name!r} is not a .json, .jsonl, .csv or .parquet file")
        return load_dataset(name, split="train", token=token)
    except UsageError:
        raise
    except Exception as error:  # datasets raises many types; the user needs the name and the first line
        reason = first_line(error.__cause__ or error)  # datasets wraps the reader's error in a generic one
        if extension in LOCAL_DATA_FORMATS:
            if "corresponds to no data" in reason:  # datasets' word for a file without rows
                raise UsageError(f"dataset {name!r} is empty") from None
            raise UsageError(f"could not read dataset file {name!r}: {reason[:200]}. Give one example per row "
                             f"(JSON Lines, a JSON list of objects, CSV or Parquet)") from None
        raise UsageError(f"could not load dataset {name!r}: {reason[:200]}. Check the name or path; for a gated or "
                         f"private Hub dataset set HF_TOKEN; offline, use a local file or `stdlib-code`.") from None


def _check_text(dataset: Dataset, name: str, columns: list[str]) -> None:
    """Every value of the given columns is a string: a null or a list would otherwise train as 'None' or its repr."""
    for column in columns:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                kind = "null" if value is None else f"of type {type(value).__name__}"
                raise UsageError(f"dataset {name!r} row {row}: {column} is {kind}, not text; every value of "
                                 f"{' and '.join(columns)} must be a string (one example per row)")


def load_examples(name: str, prompt_column: str = "prompt", completion_column: str = "completion",
                  token: str | None = None) -> Dataset:
    """Columns `prompt` (the formatted prompt, "" for text data) and `completion` (what follows it): each pair in
    StarCoder's fine-tuning format, or a file's own `text` as one completion with no prompt."""
    if name == embedded.STDLIB_DATASET:
        name = str(embedded.stdlib_dataset_file())
    dataset = _read(name, token)
    columns = set(dataset.column_names)
    if {prompt_column, completion_column} <= columns:
        _check_text(dataset, name, [prompt_column, completion_column])
        dataset = dataset.map(lambda ex: {"prompt": format_prompt(ex[prompt_column]),
                                          "completion": " " + ex[completion_column]},
                              remove_columns=dataset.column_names)
    elif "text" in columns and (prompt_column, completion_column) == ("prompt", "completion"):
        _check_text(dataset, name, ["text"])
        dataset = dataset.map(lambda ex: {"prompt": "", "completion": ex["text"]}, remove_columns=dataset.column_names)
    else:
        raise UsageError(f"dataset {name!r} has columns {sorted(columns)}; it needs {prompt_column} and "
                         f"{completion_column} (set --prompt_column/--completion_column), or text")
    if len(dataset) == 0:
        raise UsageError(f"dataset {name!r} is empty")
    return dataset


def has_prompts(examples: Dataset) -> bool:
    return any(examples["prompt"])


def fingerprint(examples: Dataset) -> str:
    """A digest of the examples' content: a resumed run refuses data that changed under the same name."""
    digest = hashlib.sha256()
    for prompt, completion in zip(examples["prompt"], examples["completion"]):
        digest.update(prompt.encode() + b"\0" + completion.encode() + b"\0")
    return digest.hexdigest()[:16]


def tokenize(examples: Dataset, tokenizer, seq_length: int, packing: bool = False, completion_only: bool = False,
             per_example: bool = True) -> Dataset:
    """input_ids and labels, EOS after every example; with `completion_only` the prompt's labels are -100. Padding:
    each example truncated to `seq_length` (the collator pads); packing: see `pack`."""
    def encode(batch):
        prompts = tokenizer(batch["prompt"], add_special_tokens=False, verbose=False)["input_ids"]
        completions = tokenizer(batch["completion"], add_special_tokens=False, verbose=False)["input_ids"]
        ids = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompts, completions)]
        labels = [([IGNORE_INDEX] * len(p) if completion_only else p) + c + [tokenizer.eos_token_id]
                  for p, c in zip(prompts, completions)]
        if packing:
            return {"input_ids": ids, "labels": labels}
        return {"input_ids": [x[:seq_length] for x in ids], "labels": [x[:seq_length] for x in labels]}

    encoded = examples.map(encode, batched=True, remove_columns=examples.column_names)
    return pack(encoded, seq_length, per_example) if packing else encoded


def pack(encoded: Dataset, seq_length: int, per_example: bool = True) -> Dataset:
    """Examples (input_ids, labels) joined and cut into blocks of exactly `seq_length`; an example may continue in
    the next block, only the final partial block is dropped, and no token is padding.

    `per_example` adds position_ids that restart at 0 at every example (and block) start, which keeps examples apart
    in attention, and drops the label of each example's first token (it would be predicted from another example).
    Joined packing (bigcode's ConstantLengthDataset) does neither: examples attend to the ones before them.
    """
    def cut(batch):
        streams = [list(chain.from_iterable(column)) for column in
                   (batch["input_ids"], batch["labels"], [range(len(x)) for x in batch["input_ids"]])]
        starts = range(0, len(streams[0]) - seq_length + 1, seq_length)
        blocks = {key: [stream[i : i + seq_length] for i in starts]
                  for key, stream in zip(("input_ids", "labels", "position_ids"), streams)}
        if not per_example:
            del blocks["position_ids"]
            return blocks
        for positions, labels in zip(blocks["position_ids"], blocks["labels"]):
            # a block may open in the middle of an example: that fragment's positions restart at 0 too
            end = next((i for i, p in enumerate(positions) if p == 0 and i), len(positions))
            positions[:end] = [p - positions[0] for p in positions[:end]]
            for i, position in enumerate(positions):
                if position == 0:
                    labels[i] = IGNORE_INDEX
        return blocks

    # One batch: blocks never end early at a map-batch boundary.
    packed = encoded.map(cut, batched=True, batch_size=max(len(encoded), 1), remove_columns=encoded.column_names)
    if len(packed) == 0:
        raise UsageError(f"--packing made no full block of --seq_length {seq_length} tokens from {len(encoded)} "
                         f"examples; lower --seq_length, add data, or leave out --packing")
    return packed


def check_labels(tokenized: Dataset, what: str, seq_length: int) -> None:
    """Refuse examples that keep nothing to learn within `seq_length` (a loss over no token is NaN); warn, in one
    line, when only some lose their completion."""
    empty = sum(all(label == IGNORE_INDEX for label in labels) for labels in tokenized["labels"])
    if empty == len(tokenized):
        raise UsageError(f"none of the {what} keeps a completion token within --seq_length {seq_length}: nothing to "
                         f"learn from; raise --seq_length, or train on whole examples with --completion_only_loss "
                         f"false")
    if empty:
        print(f"warning: {empty} of {len(tokenized)} {what} keep no completion token within --seq_length "
              f"{seq_length} and teach nothing", flush=True)


def split(examples: Dataset, max_eval_samples: int, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out up to `max_eval_samples` (at most 1 in 20) examples; a one-example set is evaluated on itself."""
    if len(examples) < 2:
        return examples, examples
    held_out = min(max_eval_samples, max(1, len(examples) // 20))
    parts = examples.train_test_split(test_size=held_out, seed=seed)
    return parts["train"], parts["test"]


class Collator:
    """Padded examples: ids padded with the pad token and labels with -100, so padding never trains. Packed blocks
    with per-example position_ids: stacked, with no attention mask (transformers then keeps examples apart by their
    positions) and the example boundaries as FlashAttention's variable-length arguments for the GPU kernel
    (finetune/attention.py), computed here on the CPU so the training step never waits for them."""

    def __init__(self, tokenizer):
        self.pad = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)

    def __call__(self, features: list[dict]) -> dict:
        if "position_ids" not in features[0]:
            return self.pad(features)
        batch = {key: torch.tensor([f[key] for f in features]) for key in ("input_ids", "labels", "position_ids")}
        flat = batch["position_ids"].flatten()
        boundaries = torch.cat([torch.nonzero(flat == 0).flatten(), torch.tensor([flat.numel()])]).to(torch.int32)
        longest = int((boundaries[1:] - boundaries[:-1]).max())
        return {**batch, "cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries, "max_length_q": longest,
                "max_length_k": longest}
