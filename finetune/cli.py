"""The command line every script shares, and the one way a script reports bad input: a line on stderr and exit 2."""

import sys
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

from . import secrets


class UsageError(Exception):
    """Bad input from the user: the message says what was wrong and what to do. Never a traceback."""


class Stopped(Exception):
    """A run stopped by a signal after writing its checkpoint; exits 128 + the signal number, as a shell would."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainArguments:
    model: str = field(default="bigcode/starcoder", metadata={
        "help": "Hub id or local path of the base model; `tiny-starcoder` builds a small StarCoder locally."})
    dataset: str = field(default="HuggingFaceH4/CodeAlpaca_20K", metadata={
        "help": "Hub id, or a local .json/.jsonl/.csv/.parquet file with prompt/completion (or text) columns; "
                "`stdlib-code` builds pairs from this Python's standard library."})
    quantization: Literal["4bit", "8bit", "none"] = field(default="4bit", metadata={
        "help": "4bit: NF4 + double quantization (QLoRA); 8bit: LLM.int8, as the tutorial; none: a 16-bit base."})
    seq_length: int = field(default=512, metadata={"help": "Tokens per example; longer examples are truncated."})
    batch_size: int = field(default=4, metadata={"help": "Examples per device per step."})
    max_train_steps: int = field(default=60, metadata={"help": "Optimizer steps to train."})
    output_dir: str = field(default="./outputs", metadata={"help": "Where checkpoints, the adapter and W&B runs go."})
    report_to: Literal["wandb", "none"] = field(default="wandb", metadata={
        "help": "wandb logs online when credentials are configured, otherwise offline under output_dir."})
    wandb_project: str = field(default="starcoder-lora", metadata={"help": "W&B project name."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, LoRA initialisation and dropout."})
    learning_rate: float = field(default=2e-4, metadata={
        "help": "Peak learning rate (the QLoRA paper's 2e-4 for small models)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA input (the tutorial: 0.05). 0 skips a full-activation mask per adapted layer."})
    lora_target_modules: str = field(default="", metadata={
        "help": "Comma-separated module names to adapt; empty picks the architecture's attention layers "
                "(GPTBigCode: c_attn,c_proj)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, about a quarter slower."})
    packing: bool = field(default=False, metadata={
        "help": "Join examples with EOS into full seq_length blocks (no padding) instead of padding each one."})
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(default="auto", metadata={
        "help": "Compute dtype; auto: bf16 on GPUs that have it, else fp16; fp32 on the CPU."})
    fp32_upcast: bool = field(default=False, metadata={
        "help": "Keep fp32 copies of norms, embeddings and LM head (peft's prepare_model_for_kbit_training): the "
                "classic QLoRA set-up; slower and larger, and bf16 norms train fine (docs/PERFORMANCE.md)."})
    fp32_adapter: bool = field(default=False, metadata={
        "help": "LoRA weights in fp32 (peft's default) instead of the compute dtype: casts every adapted layer's "
                "input, about 15%% slower on StarCoder-15B. Always on with fp16, whose loss scaler needs fp32."})
    mixed_precision: bool = field(default=False, metadata={
        "help": "Run under autocast. Off: a bf16 model computes in bf16 throughout, with no casts around "
                "bitsandbytes layers (fp16 always uses autocast with a loss scaler)."})
    recipe: Literal["", "fast", "lean", "qlora", "tutorial"] = field(default="", metadata={
        "help": "Preset flags (explicit flags still win): fast = packed 4 x 2048; lean = packed 1 x 2048 with "
                "checkpointing (StarCoder-15B in under 14 GiB); qlora = the common QLoRA recipe; tutorial = the "
                "tutorial's 8-bit fp16 set-up. See docs/PERFORMANCE.md."})
    prompt_column: str = field(default="prompt", metadata={"help": "The data set's column with the prompt."})
    completion_column: str = field(default="completion", metadata={"help": "Its column with the completion."})
    resume: Literal["auto", "never"] = field(default="auto", metadata={
        "help": "auto: continue from the newest complete checkpoint in --output_dir if it holds this configuration."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an --output_dir that holds another run (its checkpoints are deleted)."})
    grace_period_seconds: float = field(default=25.0, metadata={
        "help": "On SIGTERM/SIGINT: time to finish the step and write a checkpoint before exiting regardless."})
    hf_token: str = field(default="", metadata={
        "help": "Hugging Face token for gated models and data sets (default: $HF_TOKEN). Never printed or saved."})
    eval_steps: int = field(default=20, metadata={"help": "Evaluate (and checkpoint) every this many steps."})
    logging_steps: int = field(default=5, metadata={"help": "Log the loss and throughput every this many steps."})
    max_eval_samples: int = field(default=64, metadata={"help": "Held-out examples used for evaluation."})


# The recipes measured side by side in bench/recipes.py and docs/PERFORMANCE.md, as TrainArguments values.
_CLASSIC = dict(fp32_upcast=True, fp32_adapter=True, mixed_precision=True, lora_dropout=0.05)
RECIPES = {
    "fast": dict(batch_size=4, seq_length=2048, packing=True),
    "lean": dict(batch_size=1, seq_length=2048, packing=True, gradient_checkpointing=True),
    "qlora": dict(_CLASSIC, batch_size=8, seq_length=2048, packing=True, gradient_checkpointing=True),
    "tutorial": dict(_CLASSIC, quantization="8bit", dtype="float16", batch_size=1, seq_length=512),
}


def parse(*dataclass_types, argv=None):
    """Parse argv into the given dataclasses (only scripts' `__main__` blocks and tests call this). A --recipe
    becomes the parser's defaults, so flags given explicitly still win."""
    parser = HfArgumentParser(dataclass_types)
    known, unknown = parser.parse_known_args(args=argv)
    if unknown:
        raise UsageError(f"unknown arguments {unknown}; see --help")
    if getattr(known, "recipe", ""):
        parser.set_defaults(**RECIPES[known.recipe])
    return parser.parse_args_into_dataclasses(args=argv)


def run(main, *dataclass_types, argv=None):
    """Parse, call `main(*args)`, and turn a UsageError into one line on stderr and exit status 2."""
    try:
        arguments = parse(*dataclass_types, argv=argv)
        secrets.scrub_argv()
        return main(*arguments)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {value}")
