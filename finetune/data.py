"""Data: load prompt/completion pairs, format them as StarCoder's fine-tune does, tokenize, split, and batch."""

import os
from itertools import chain

from datasets import Dataset, load_dataset
from transformers import DataCollatorForSeq2Seq

from . import embedded
from .cli import UsageError

# The format of bigcode/starcoder's own fine-tuning script (finetune/finetune.py, prepare_sample_text):
# "Question: {prompt}\n\nAnswer: {completion}". A prompt for generation stops before the space, which the
# byte-level BPE merges into the completion's first token ("Ġdef").
PROMPT_TEMPLATE = "Question: {prompt}\n\nAnswer:"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt=prompt)


def load_texts(name: str, prompt_column: str = "prompt", completion_column: str = "completion",
               token: str | None = None) -> Dataset:
    """A Dataset with one `text` column: each prompt/completion pair formatted, or the file's own `text`."""
    if name == embedded.STDLIB_DATASET:
        name = str(embedded.stdlib_dataset_file())
    extension = os.path.splitext(name)[1].lower()
    try:
        if extension in LOCAL_FORMATS:
            if not os.path.isfile(name):
                raise UsageError(f"dataset file {name!r} does not exist")
            dataset = load_dataset(LOCAL_FORMATS[extension], data_files=name, split="train")
        elif os.path.exists(name):
            raise UsageError(f"dataset {name!r} is not a .json, .jsonl, .csv or .parquet file")
        else:
            dataset = load_dataset(name, split="train", token=token)
    except UsageError:
        raise
    except Exception as error:  # datasets raises many types; the user needs the name and the first line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if extension in LOCAL_FORMATS:
            if os.path.getsize(name) == 0 or "corresponds to no data" in reason:  # datasets' word for no rows
                raise UsageError(f"dataset {name!r} is empty") from None
            raise UsageError(f"could not read dataset file {name!r} as {LOCAL_FORMATS[extension]}: {reason}") from None
        raise UsageError(f"could not load dataset {name!r}: {reason}. Check the name or path; for a gated or "
                         f"private Hub dataset set HF_TOKEN; offline, use a local file or `stdlib-code`.") from None
    columns = set(dataset.column_names)
    if {prompt_column, completion_column} <= columns:
        dataset = dataset.map(lambda ex: {"text": format_prompt(ex[prompt_column]) + " " + ex[completion_column]},
                              remove_columns=dataset.column_names)
    elif "text" in columns and (prompt_column, completion_column) == ("prompt", "completion"):
        dataset = dataset.select_columns(["text"])
    else:
        raise UsageError(f"dataset {name!r} has columns {sorted(columns)}; it needs {prompt_column} and "
                         f"{completion_column} (set --prompt_column/--completion_column), or text")
    if len(dataset) == 0:
        raise UsageError(f"dataset {name!r} is empty")
    return dataset


def tokenize(texts: Dataset, tokenizer, seq_length: int, packing: bool = False) -> Dataset:
    """Token ids with EOS appended to every example, and labels equal to the ids (the collator sets padding to -100).

    Padding: each example truncated to `seq_length`. Packing (bigcode/starcoder's ConstantLengthDataset): examples
    are joined, each ending with EOS, and cut into blocks of exactly `seq_length`; only the final partial block
    is dropped, and no token is padding.
    """
    def encode(batch):
        ids = [tokens + [tokenizer.eos_token_id] for tokens in
               tokenizer(batch["text"], add_special_tokens=False)["input_ids"]]
        if packing:
            stream = list(chain.from_iterable(ids))
            ids = [stream[i : i + seq_length] for i in range(0, len(stream) - seq_length + 1, seq_length)]
        else:
            ids = [tokens[:seq_length] for tokens in ids]
        return {"input_ids": ids, "labels": [list(tokens) for tokens in ids]}

    # Packing joins across the whole set in one batch, so blocks never end early at a map-batch boundary.
    return texts.map(encode, batched=True, batch_size=len(texts) if packing else 1000, remove_columns=["text"])


def split(texts: Dataset, max_eval_samples: int, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out up to `max_eval_samples` (at most 1 in 20) examples; a one-example set is evaluated on itself."""
    if len(texts) < 2:
        return texts, texts
    held_out = min(max_eval_samples, max(1, len(texts) // 20))
    parts = texts.train_test_split(test_size=held_out, seed=seed)
    return parts["train"], parts["test"]


def collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Pads ids with the pad token and labels with -100, so padding is never trained on."""
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
