"""The command line every script shares, and the one way a script reports bad input: a line on stderr and exit 2."""

import sys
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser


class UsageError(Exception):
    """Bad input from the user: the message says what was wrong and what to do. Never a traceback."""


@dataclass
class TrainArguments:
    model: str = field(default="bigcode/starcoder", metadata={
        "help": "Hub id or local path of the base model; `tiny-starcoder` builds a small StarCoder locally."})
    dataset: str = field(default="HuggingFaceH4/CodeAlpaca_20K", metadata={
        "help": "Hub id, or a local .json/.jsonl/.csv/.parquet file with prompt/completion (or text) columns; "
                "`stdlib-code` builds pairs from this Python's standard library."})
    quantization: Literal["4bit", "8bit", "none"] = field(default="4bit", metadata={
        "help": "4bit: NF4 + double quantization (QLoRA); 8bit: LLM.int8 as the tutorial; none: LoRA on a 16-bit base."})
    seq_length: int = field(default=512, metadata={"help": "Tokens per example; longer examples are truncated."})
    batch_size: int = field(default=4, metadata={"help": "Examples per device per step."})
    max_train_steps: int = field(default=60, metadata={"help": "Optimizer steps to train."})
    output_dir: str = field(default="./outputs", metadata={"help": "Where checkpoints, the adapter and W&B runs go."})
    report_to: Literal["wandb", "none"] = field(default="wandb", metadata={
        "help": "wandb logs online when credentials are configured, otherwise offline under output_dir."})
    wandb_project: str = field(default="starcoder-lora", metadata={"help": "W&B project name."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, LoRA initialisation and dropout."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (QLoRA paper: 2e-4 for small models)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(default="", metadata={
        "help": "Comma-separated module names to adapt; empty picks the architecture's attention layers "
                "(GPTBigCode: c_attn,c_proj)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, about a quarter slower."})
    eval_steps: int = field(default=20, metadata={"help": "Evaluate (and checkpoint) every this many steps."})
    logging_steps: int = field(default=5, metadata={"help": "Log the loss and throughput every this many steps."})
    max_eval_samples: int = field(default=64, metadata={"help": "Held-out examples used for evaluation."})


def parse(*dataclass_types, argv=None):
    """Parse argv into the given dataclasses (only scripts' `__main__` blocks and tests call this)."""
    return HfArgumentParser(dataclass_types).parse_args_into_dataclasses(args=argv)


def run(main, *dataclass_types, argv=None):
    """Parse, call `main(*args)`, and turn a UsageError into one line on stderr and exit status 2."""
    args = parse(*dataclass_types, argv=argv)
    try:
        return main(*args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {value}")
