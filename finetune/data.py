"""Data: load prompt/completion pairs, conversations or text, format them as StarCoder's fine-tune does (or as the
tokenizer's chat template says), tokenize (packed or padded, optionally in FIM form), split, and batch."""

import hashlib
import os
import random
from itertools import chain

import torch
from datasets import Dataset, load_dataset
from transformers import DataCollatorForSeq2Seq

from . import embedded, fim, repository
from .cli import LOCAL_DATA_FORMATS
from .errors import UsageError, first_line
from .fim import IGNORE_INDEX

# The format of bigcode/starcoder's own fine-tuning script (finetune/finetune.py, prepare_sample_text):
# "Question: {prompt}\n\nAnswer: {completion}". A prompt for generation stops before the space, which the
# byte-level BPE merges into the completion's first token ("Ġdef").
PROMPT_TEMPLATE = "Question: {prompt}\n\nAnswer:"
ROLES = ("system", "user", "assistant")
# How examples become text, recorded with the run (generate.py wraps prompts the same way): StarCoder's
# Question/Answer format (prompt/completion pairs, and conversations without a chat template), the tokenizer's chat
# template (conversations), or plain text (a `text` column, source files).
FORMATS = ("question_answer", "chat_template", "text")


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def _duplicate_csv_columns(name: str) -> list[str]:
    """Column names a CSV header gives twice (datasets would rename the second copy and train on the first)."""
    import csv

    with open(name, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return sorted({column for column in header if header.count(column) > 1})


def _read(name: str, token: str | None, split: str) -> Dataset:
    extension = os.path.splitext(name)[1].lower()
    try:
        if extension in LOCAL_DATA_FORMATS:
            if not os.path.isfile(name):
                raise UsageError(f"dataset file {name!r} does not exist")
            if os.path.getsize(name) == 0:
                raise UsageError(f"dataset {name!r} is empty")
            if split != "train":
                raise UsageError(f"dataset file {name!r} has one split, train; --dataset_split and --eval_split "
                                 f"name splits of Hub data sets")
            if extension == ".csv" and _duplicate_csv_columns(name):
                raise UsageError(f"dataset {name!r}: its header names {', '.join(_duplicate_csv_columns(name))} "
                                 f"twice; give each column one name")
            return load_dataset(extension.lstrip(".").replace("jsonl", "json"), data_files=name, split="train")
        if os.path.exists(name):
            raise UsageError(f"dataset {name!r} is not a .json, .jsonl, .csv or .parquet file")
        return load_dataset(name, split=split, token=token)
    except UsageError:
        raise
    except Exception as error:  # datasets raises many types; the user needs the name and the first line
        reason = first_line(error.__cause__ or error)  # datasets wraps the reader's error in a generic one
        if extension in LOCAL_DATA_FORMATS:
            if "corresponds to no data" in reason:  # datasets' word for a file without rows
                raise UsageError(f"dataset {name!r} is empty") from None
            raise UsageError(f"could not read dataset file {name!r}: {reason[:200]}. Give one example per row "
                             f"(JSON Lines, a JSON list of objects, CSV or Parquet)") from None
        raise UsageError(f"could not load dataset {name!r} (split {split!r}): {reason[:200]}. Check the name, "
                         f"path or split; for a gated or private Hub dataset set HF_TOKEN; offline, use a local file "
                         f"or `stdlib-code`.") from None


def _check_text(dataset: Dataset, name: str, columns: list[str]) -> None:
    """Every value of the given columns is a string: a null or a list would otherwise train as 'None' or its repr."""
    for column in columns:
        for row, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                kind = "null" if value is None else f"of type {type(value).__name__}"
                raise UsageError(f"dataset {name!r} row {row}: {column} is {kind}, not text; every value of "
                                 f"{' and '.join(columns)} must be a string (one example per row)")


def _check_conversation(messages, name: str, row: int) -> None:
    """A conversation: a list of {"role", "content"} turns with text content, an optional system turn first, and at
    least one assistant turn, each after a user turn."""
    def refuse(why: str):
        raise UsageError(f"dataset {name!r} row {row}: messages {why}; each row's messages are a list of "
                         f'{{"role": "system" | "user" | "assistant", "content": text}} turns')

    if not isinstance(messages, list) or not messages:
        refuse("is not a non-empty list")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            refuse(f"turn {turn} has no text content")
        if message.get("role") not in ROLES or (message["role"] == "system" and turn):
            refuse(f"turn {turn} has role {message.get('role')!r} (a system turn may only come first)")
    roles = [message["role"] for message in messages]
    if "assistant" not in roles or "user" not in roles[: roles.index("assistant")]:
        refuse("has no assistant turn after a user turn: nothing to train")


def _question_answer_segments(messages: list[dict], eos: str) -> list[str]:
    """A conversation in StarCoder's Question/Answer format: a system turn opens it, each user turn is a question,
    each assistant turn an answer that ends with the end-of-text token (the last one's is added when tokenized)."""
    segments, pending = [], ""
    for turn, message in enumerate(messages):
        if message["role"] == "system":
            pending += message["content"] + "\n\n"
        elif message["role"] == "user":
            pending += format_prompt(message["content"])
        else:
            last = turn == len(messages) - 1 or "assistant" not in [m["role"] for m in messages[turn + 1 :]]
            segments += [pending, " " + message["content"] + ("" if last else eos)]
            pending = ""
    return segments


def _chat_template_segments(messages: list[dict], tokenizer, name: str, row: int) -> list[str]:
    """A conversation rendered by the tokenizer's chat template, cut where each assistant turn starts and ends (the
    text each further turn adds to the rendering), so the turns' own end tokens are trained with them."""
    segments, done = [], ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise UsageError(f"dataset {name!r} row {row}: the tokenizer's chat template does not render this "
                             f"conversation turn by turn (an earlier turn changes as later ones are added), so the "
                             f"assistant turns cannot be told apart; give prompt/completion rows instead")
        segments += [before[len(done):], after[len(before):]]
        done = after
    return segments


def load_examples(name: str, prompt_column: str = "prompt", completion_column: str = "completion",
                  token: str | None = None, tokenizer=None, split: str = "train", extensions: str = "",
                  max_file_bytes: int = 1_000_000) -> tuple[Dataset, str]:
    """The examples as a `segments` column, untrained and trained text alternating (an untrained segment first,
    possibly empty), and their format (FORMATS): prompt/completion pairs in StarCoder's fine-tuning format; a
    `messages` column of conversations through the tokenizer's chat template where it has one, else in the same
    Question/Answer format, the assistant turns trained; a `text` column, or a source tree's files
    (finetune/repository.py), trained whole."""
    if name == embedded.STDLIB_DATASET:
        name = str(embedded.stdlib_dataset_file())
    if name == embedded.STDLIB_SOURCE:
        name = str(embedded.stdlib_source_tree())
    if repository.is_source_tree(name):
        if split != "train":
            raise UsageError(f"a source tree ({name!r}) has one split, train; --dataset_split and --eval_split name "
                             f"splits of Hub data sets")
        return repository.load(name, extensions, max_file_bytes, tokenizer), "text"
    if extensions:
        raise UsageError("--extensions chooses the files of a source tree; --dataset is not one")
    if prompt_column == completion_column:
        raise UsageError(f"--prompt_column and --completion_column are both {prompt_column!r}; name two columns")
    dataset = _read(name, token, split)
    columns = set(dataset.column_names)
    named = (prompt_column, completion_column) != ("prompt", "completion")
    if {prompt_column, completion_column} <= columns:
        _check_text(dataset, name, [prompt_column, completion_column])
        data_format, trained = "question_answer", completion_column
        dataset = dataset.map(lambda ex: {"segments": [format_prompt(ex[prompt_column]), " " + ex[completion_column]]},
                              remove_columns=dataset.column_names)
    elif "messages" in columns and not named:
        with_template = tokenizer is not None and tokenizer.chat_template is not None
        data_format, trained = "chat_template" if with_template else "question_answer", "assistant turn"
        rows = []
        for row, messages in enumerate(dataset["messages"]):
            _check_conversation(messages, name, row)
            rows.append(_chat_template_segments(messages, tokenizer, name, row) if with_template
                        else _question_answer_segments(messages, tokenizer.eos_token if tokenizer else ""))
        dataset = Dataset.from_dict({"segments": rows})
    elif "text" in columns and not named:
        _check_text(dataset, name, ["text"])
        data_format, trained = "text", "text"
        dataset = dataset.map(lambda ex: {"segments": ["", ex["text"]]}, remove_columns=dataset.column_names)
    else:
        raise UsageError(f"dataset {name!r} has columns {sorted(columns)}; it needs {prompt_column} and "
                         f"{completion_column} (set --prompt_column/--completion_column), messages, or text")
    if len(dataset) == 0:
        raise UsageError(f"dataset {name!r} is empty")
    if not any(segment.strip() for segments in dataset["segments"] for segment in segments[1::2]):
        raise UsageError(f"dataset {name!r}: every {trained} is empty, so the adapter would learn only to end its "
                         f"answer; check the data and its columns")
    return dataset, data_format


def has_prompts(examples: Dataset) -> bool:
    return any(any(segments[0::2]) for segments in examples["segments"])


def fingerprint(*datasets: Dataset) -> str:
    """A digest of the examples' content: a resumed run refuses data that changed under the same name."""
    digest = hashlib.sha256()
    for examples in datasets:
        for segments in examples["segments"]:
            digest.update(b"".join(segment.encode() + b"\0" for segment in segments))
    return digest.hexdigest()[:16]


def leading_special_ids(tokenizer) -> list[int]:
    """The ids the tokenizer puts before every text it encodes: Llama's <s>; none for StarCoder."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    return full[: full.index(plain[0])] if plain and plain[0] in full else []


def tokenize(examples: Dataset, tokenizer, seq_length: int, packing: bool = False, completion_only: bool = False,
             per_example: bool = True, append_eos: bool = True, fim_options: fim.Fim | None = None,
             seed: int = 0) -> Dataset:
    """input_ids and labels: the tokenizer's leading special tokens, each segment's tokens, and EOS after every
    example (`append_eos`; a chat template ends its turns itself); with `completion_only` the untrained segments'
    labels are -100. Padding: each example truncated to `seq_length` (the collator pads), in FIM form with
    `fim_options`; packing: see `pack`."""
    leading = leading_special_ids(tokenizer)
    ending = [tokenizer.eos_token_id] if append_eos else []
    rng = random.Random(seed)

    def encode(batch):
        flat = tokenizer(list(chain.from_iterable(batch["segments"])), add_special_tokens=False,
                         verbose=False)["input_ids"]
        ids, labels, used = [], [], 0
        for segments in batch["segments"]:
            pieces, used = flat[used : used + len(segments)], used + len(segments)
            example = leading + list(chain.from_iterable(pieces)) + ending
            trained = [IGNORE_INDEX] * len(leading) + list(chain.from_iterable(
                [IGNORE_INDEX] * len(piece) if completion_only and not index % 2 else piece
                for index, piece in enumerate(pieces))) + ending
            if not packing:
                example, trained = example[:seq_length], trained[:seq_length]
                if fim_options:
                    example, trained = fim.permute(example, fim_options, rng)
            ids.append(example)
            labels.append(trained)
        return {"input_ids": ids, "labels": labels}

    encoded = examples.map(encode, batched=True, remove_columns=examples.column_names)
    return pack(encoded, seq_length, per_example, fim_options, seed) if packing else encoded


def pack(encoded: Dataset, seq_length: int, per_example: bool = True, fim_options: fim.Fim | None = None,
         seed: int = 0) -> Dataset:
    """Examples (input_ids, labels) joined and cut into blocks of exactly `seq_length`; an example may continue in
    the next block, only the final partial block is dropped, and no token is padding.

    `per_example` adds position_ids that restart at 0 at every example (and block) start, which keeps examples apart
    in attention, and drops the label of each example's first token (it would be predicted from another example).
    Joined packing (bigcode's ConstantLengthDataset) does neither: examples attend to the ones before them.
    `fim_options` turns each example's fragment in a block into fill-in-the-middle form (finetune/fim.py), drawn
    from `seed`.
    """
    rng = random.Random(seed)

    def cut(batch):
        streams = [list(chain.from_iterable(column)) for column in
                   (batch["input_ids"], batch["labels"], [range(len(x)) for x in batch["input_ids"]])]
        starts = range(0, len(streams[0]) - seq_length + 1, seq_length)
        blocks = {key: [stream[i : i + seq_length] for i in starts]
                  for key, stream in zip(("input_ids", "labels", "position_ids"), streams)}
        for ids, positions, labels in zip(blocks["input_ids"], blocks["position_ids"], blocks["labels"]):
            # a block may open in the middle of an example: that fragment's positions restart at 0 too
            end = next((i for i, p in enumerate(positions) if p == 0 and i), len(positions))
            positions[:end] = [p - positions[0] for p in positions[:end]]
            bounds = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            for start, stop in zip(bounds, bounds[1:]):
                if fim_options:
                    ids[start:stop], labels[start:stop] = fim.permute(ids[start:stop], fim_options, rng)
                if per_example:
                    labels[start] = IGNORE_INDEX
        if not per_example:
            del blocks["position_ids"]
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


def load_splits(dataset: str, prompt_column: str, completion_column: str, tokenizer, token: str | None,
                max_eval_samples: int, seed: int, dataset_split: str = "train", eval_dataset: str = "",
                eval_split: str = "", extensions: str = "",
                max_file_bytes: int = 1_000_000) -> tuple[Dataset, Dataset, str, str]:
    """Training and held-out examples, their format, and a digest of the data read (whatever the split): the
    held-out ones from `eval_dataset` (its `eval_split`, default train) or `dataset`'s `eval_split`, at most
    `max_eval_samples` of them drawn with `seed`; otherwise held out from `dataset` (`split`): for a source tree,
    whole files."""
    examples, data_format = load_examples(dataset, prompt_column, completion_column, token, tokenizer, dataset_split,
                                          extensions, max_file_bytes)
    if not (eval_dataset or eval_split):
        return *split(examples, max_eval_samples, seed), data_format, fingerprint(examples)
    source = eval_dataset or dataset
    if source == dataset and (eval_split or "train") == dataset_split:
        raise UsageError(f"--eval_split {eval_split or 'train'!r} is the split trained on; hold out another split, "
                         f"or leave --eval_split out to hold out examples of it")
    held_out, held_out_format = load_examples(source, prompt_column, completion_column, token, tokenizer,
                                              eval_split or "train", extensions, max_file_bytes)
    if held_out_format != data_format:
        raise UsageError(f"the held-out data {source!r} is {held_out_format} data and the training data "
                         f"{dataset!r} is {data_format}; evaluate on data of the same kind")
    digest = fingerprint(examples, held_out)
    held_out = held_out.shuffle(seed=seed).select(range(min(len(held_out), max_eval_samples)))
    return examples, held_out, data_format, digest


FEW_HELD_OUT = 20  # below this many examples a held-out loss says little


def warn_if_few_held_out(count: int) -> None:
    if count < FEW_HELD_OUT:
        print(f"warning: the held-out loss is over {count} example{'s' * (count != 1)} (fewer than {FEW_HELD_OUT}), "
              f"too few to tell the adapter from the base; give --eval_dataset, or more data", flush=True)


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
