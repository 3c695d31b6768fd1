"""The command line every training script shares: its arguments, checked where they enter, and the recipes.

Bad input never reaches training: each dataclass checks its own values in `__post_init__` (as transformers'
run_clm.py does), and `run` turns a UsageError into one `error: ...` line and exit status 2.
"""

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from . import secrets
from .errors import Finished, Stopped, UsageError

# Schedules the Trainer names (transformers.SchedulerType), those that need no extra arguments.
SCHEDULERS = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
                     "inverse_sqrt"]
LOCAL_DATA_FORMATS = (".json", ".jsonl", ".csv", ".parquet")


def check_positive(**values) -> None:
    for name, value in values.items():
        if not value > 0:
            raise UsageError(f"--{name} must be a positive integer, got {value}")


def check_given(**values: str) -> None:
    for name, value in values.items():
        if not value.strip():
            raise UsageError(f"--{name} must not be empty")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def local_path(value: str) -> str:
    """A path that exists here (or names a local data file) made absolute, so `data/x.jsonl` and its absolute form
    are the same run; a Hub id is kept as it is."""
    if os.path.exists(value) or value.lower().endswith(LOCAL_DATA_FORMATS):
        return os.path.abspath(value)
    return value


@dataclass
class TrainArguments:
    # Model
    model: str = field(default="bigcode/starcoder", metadata={
        "help": "Hub id or local path of the base model; `tiny-starcoder` builds a small StarCoder locally."})
    quantization: Literal["4bit", "8bit", "fp8", "none"] = field(default="4bit", metadata={
        "help": "How the frozen base is stored and multiplied. 4bit: NF4 + double quantization (QLoRA); 8bit: "
                "LLM.int8, as the tutorial; fp8: e4m3 on FP8 tensor cores (compute capability 8.9+: Ada, Hopper, "
                "Blackwell); none: a 16-bit base."})
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(default="auto", metadata={
        "help": "Compute dtype; auto: bf16 on GPUs that have it, else fp16; fp32 on the CPU."})
    hf_token: str = field(default="", metadata={
        "help": "Hugging Face token for gated models and data sets; $HF_TOKEN when not given. Never printed or "
                "saved."})
    # Data
    dataset: str = field(default="HuggingFaceH4/CodeAlpaca_20K", metadata={
        "help": "Hub id, or a local .json/.jsonl/.csv/.parquet file with prompt/completion, messages (a list of "
                "{role, content} turns) or text columns; `stdlib-code` builds pairs from this Python's standard "
                "library."})
    dataset_split: str = field(default="train", metadata={"help": "The Hub data set's split to train on."})
    eval_dataset: str = field(default="", metadata={
        "help": "Held-out data (a file or Hub id, the same columns); default: held out from --dataset (at most 1 "
                "example in 20)."})
    eval_split: str = field(default="", metadata={
        "help": "The split to evaluate on: of --eval_dataset (default train), or of --dataset's Hub data set "
                "(e.g. test) instead of holding out."})
    prompt_column: str = field(default="prompt", metadata={"help": "The data set's column with the prompt."})
    completion_column: str = field(default="completion", metadata={"help": "Its column with the completion."})
    seq_length: int = field(default=512, metadata={"help": "Tokens per example (or packed block); longer examples "
                                                           "are truncated."})
    packing: bool = field(default=False, metadata={
        "help": "Pack examples into full --seq_length blocks (no padding) instead of padding each one."})
    packed_attention: Literal["per_example", "joined"] = field(default="per_example", metadata={
        "help": "With --packing: per_example keeps each example to itself (positions restart at 0, attention stops "
                "at its boundary); joined lets it attend to the examples before it in its block, positions running "
                "on (bigcode's ConstantLengthDataset)."})
    completion_only_loss: bool | None = field(default=None, metadata={
        "help": "Train on the completion only (the prompt and its template get label -100). Default: on for "
                "prompt/completion data, off for text data."})
    max_eval_samples: int = field(default=64, metadata={"help": "Held-out examples used for evaluation."})
    # LoRA
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "Dropout on the LoRA input (the tutorial: 0.05). 0 skips a full-activation mask per adapted layer."})
    lora_target_modules: str = field(default="", metadata={
        "help": "Comma-separated module names to adapt; empty picks the architecture's attention layers "
                "(GPTBigCode: c_attn,c_proj)."})
    # Training schedule
    batch_size: int = field(default=4, metadata={"help": "Examples per device per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step: the effective batch is batch_size x this x processes."})
    max_train_steps: int = field(default=60, metadata={"help": "Optimizer steps to train."})
    learning_rate: float = field(default=2e-4, metadata={
        "help": "Peak learning rate (the QLoRA paper's 2e-4 for small models)."})
    lr_scheduler_type: SCHEDULERS = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "Steps of linear warm-up; default: a tenth of the steps, at most 10."})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "Warm-up as a fraction of --max_train_steps (instead of --warmup_steps)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on the LoRA weights."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this; 0 turns it off."})
    seed: int = field(default=42, metadata={"help": "Seed for data order, LoRA initialisation and dropout."})
    eval_steps: int = field(default=20, metadata={"help": "Evaluate (and checkpoint) every this many steps."})
    logging_steps: int = field(default=5, metadata={"help": "Log the loss and throughput every this many steps."})
    # Speed
    recipe: Literal["fast", "fp8", "long", "lean", "qlora", "tutorial"] | None = field(default=None, metadata={
        "help": "Preset flags (explicit flags still win): fast = packed 4 x 2048; fp8 = fast with the base in FP8; "
                "long = whole files at StarCoder's full 8,192 tokens, 1 per batch, FP8 base (StarCoder2's 16,384: "
                "add --seq_length 16384 --gradient_checkpointing); lean = packed 1 x 2048 with checkpointing "
                "(StarCoder-15B in about 11 GiB); qlora = the common QLoRA recipe; tutorial = the tutorial's 8-bit "
                "fp16 set-up. See docs/PERFORMANCE.md."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, about a quarter slower."})
    fp32_upcast: bool = field(default=False, metadata={
        "help": "Keep fp32 copies of norms, embeddings and LM head (peft's prepare_model_for_kbit_training): the "
                "classic QLoRA set-up; slower and larger, and bf16 norms train fine (docs/PERFORMANCE.md)."})
    fp32_adapter: bool = field(default=False, metadata={
        "help": "LoRA weights in fp32 (peft's default) instead of the compute dtype: casts every adapted layer's "
                "input, about 15%% slower on StarCoder-15B. Always on with fp16, whose loss scaler needs fp32."})
    mixed_precision: bool = field(default=False, metadata={
        "help": "Run under autocast. Off: a bf16 model computes in bf16 throughout, with no casts around "
                "bitsandbytes layers (fp16 always uses autocast with a loss scaler)."})
    check_memory: bool = field(default=True, metadata={
        "help": "Before loading, estimate the GPU memory the run needs and refuse one that cannot fit, naming what "
                "would (finetune/memory.py); false: try anyway."})
    # Output and resume
    output_dir: str = field(default="./outputs", metadata={"help": "Where checkpoints, the adapter and W&B runs go."})
    resume: Literal["auto", "never"] = field(default="auto", metadata={
        "help": "auto: continue from the newest intact checkpoint in --output_dir if it holds this configuration."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start over in an --output_dir that holds another run (its checkpoints and adapter are deleted)."})
    grace_period_seconds: float = field(default=25.0, metadata={
        "help": "On SIGTERM/SIGINT: time to finish the step and write a checkpoint before exiting regardless."})
    # W&B
    report_to: Literal["wandb", "none"] = field(default="wandb", metadata={
        "help": "wandb logs online when credentials are configured and the server answers, otherwise offline under "
                "--output_dir."})
    wandb_project: str = field(default="starcoder-lora", metadata={"help": "W&B project name."})
    # Evaluation
    humaneval: bool = field(default=False, metadata={
        "help": "At the end, HumanEval pass@1 of the base and of base + adapter (generated code runs in a sandboxed "
                "subprocess per sample)."})
    humaneval_limit: int = field(default=0, metadata={"help": "With --humaneval: only the first N problems (0: "
                                                              "all 164)."})

    _help_groups = {
        "model": ("model", "quantization", "dtype", "hf_token"),
        "data": ("dataset", "dataset_split", "eval_dataset", "eval_split", "prompt_column", "completion_column",
                 "seq_length", "packing", "packed_attention", "completion_only_loss", "max_eval_samples"),
        "LoRA": ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"),
        "training": ("batch_size", "gradient_accumulation_steps", "max_train_steps", "learning_rate",
                     "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "seed",
                     "eval_steps", "logging_steps"),
        "speed": ("recipe", "gradient_checkpointing", "fp32_upcast", "fp32_adapter", "mixed_precision",
                  "check_memory"),
        "output and resume": ("output_dir", "resume", "overwrite_output_dir", "grace_period_seconds"),
        "W&B": ("report_to", "wandb_project"),
        "evaluation": ("humaneval", "humaneval_limit"),
    }

    def __post_init__(self):
        check_given(model=self.model, dataset=self.dataset, output_dir=self.output_dir,
                    prompt_column=self.prompt_column, completion_column=self.completion_column,
                    wandb_project=self.wandb_project, dataset_split=self.dataset_split)
        check_positive(batch_size=self.batch_size, max_train_steps=self.max_train_steps, lora_r=self.lora_r,
                       eval_steps=self.eval_steps, logging_steps=self.logging_steps,
                       max_eval_samples=self.max_eval_samples,
                       gradient_accumulation_steps=self.gradient_accumulation_steps)
        require(self.seq_length >= 2, f"--seq_length must be at least 2 (a token and the one it predicts), got "
                                      f"{self.seq_length}")
        for name in ("learning_rate", "grace_period_seconds"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"--{name} must be a positive number, got {value}")
        require(self.lora_alpha > 0, f"--lora_alpha must be a positive integer (scale = alpha / r), got "
                                     f"{self.lora_alpha}")
        require(0 <= self.lora_dropout < 1, f"--lora_dropout must be at least 0 and below 1, got {self.lora_dropout}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, f"--{name} must be a number, 0 or more, got {value}")
        require(0 <= self.seed < 2**32, f"--seed must be between 0 and 2**32 - 1 (numpy's range), got {self.seed}")
        require(self.warmup_steps is None or self.warmup_ratio is None, "give --warmup_steps or --warmup_ratio, "
                                                                        "not both")
        require(self.warmup_steps is None or self.warmup_steps >= 0, f"--warmup_steps must be 0 or more, got "
                                                                     f"{self.warmup_steps}")
        require(self.warmup_ratio is None or 0 <= self.warmup_ratio < 1, f"--warmup_ratio must be at least 0 and "
                                                                          f"below 1, got {self.warmup_ratio}")
        require(self.humaneval_limit >= 0, f"--humaneval_limit must be 0 (all problems) or more, got "
                                           f"{self.humaneval_limit}")
        if self.quantization == "fp8" and self.dtype not in ("auto", "bfloat16"):
            raise UsageError(f"--quantization fp8 computes in bf16 (FP8 matmuls write bf16); --dtype {self.dtype} "
                             f"cannot be used with it")
        self.model = local_path(self.model)
        self.dataset = local_path(self.dataset)
        self.eval_dataset = local_path(self.eval_dataset) if self.eval_dataset.strip() else ""

    @property
    def warmup(self) -> int | float:
        """The Trainer's warmup_steps: a count, or a fraction below 1."""
        if self.warmup_ratio is not None:
            return self.warmup_ratio
        return self.warmup_steps if self.warmup_steps is not None else min(10, self.max_train_steps // 10)


# The recipes measured side by side in bench/recipes.py and docs/PERFORMANCE.md, as TrainArguments values.
_CLASSIC = dict(fp32_upcast=True, fp32_adapter=True, mixed_precision=True, lora_dropout=0.05)
RECIPES = {
    "fast": dict(batch_size=4, seq_length=2048, packing=True),
    "fp8": dict(quantization="fp8", batch_size=4, seq_length=2048, packing=True),
    "long": dict(quantization="fp8", batch_size=1, seq_length=8192, packing=True),
    "lean": dict(batch_size=1, seq_length=2048, packing=True, gradient_checkpointing=True),
    "qlora": dict(_CLASSIC, batch_size=8, seq_length=2048, packing=True, gradient_checkpointing=True),
    "tutorial": dict(_CLASSIC, quantization="8bit", dtype="float16", batch_size=1, seq_length=512),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as a person reads it: booleans as bare flags, one spelling per option (not also --lora-r), and a
    default only where it says something and the help text does not already."""

    def _format_action_invocation(self, action):
        if not action.option_strings:
            return super()._format_action_invocation(action)
        flag = action.option_strings[0]
        if action.nargs == 0 or (action.nargs == "?" and action.const is True):
            return flag
        if action.type is string_to_bool:  # an optional boolean (default: decided by other settings)
            return f"{flag} {{true,false}}"
        return f"{flag} {self._format_args(action, action.dest.upper())}"

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, "", [], False, argparse.SUPPRESS):
            return text
        return f"{text} (on by default)" if action.default is True else f"{text} (default: {action.default})"


def _refuse(message: str):
    raise UsageError(f"{message}; see --help")


def build_parser(*dataclass_types, description: str | None = None) -> HfArgumentParser:
    """HfArgumentParser for the dataclasses, with a help group per concern (a dataclass's `_help_groups`, or its
    `_argument_group_name`), no abbreviated flags (--hf_tok would otherwise mean --hf_token) and argparse's errors
    as UsageError."""
    parser = HfArgumentParser(dataclass_types, description=description, formatter_class=_HelpFormatter,
                              allow_abbrev=False, usage="%(prog)s [options]")
    parser.error = _refuse
    for dataclass_type in dataclass_types:
        for title, names in getattr(dataclass_type, "_help_groups", {}).items():
            group = parser.add_argument_group(title)
            for action in [action for action in parser._actions if action.dest in names]:
                # argparse has no public way to move an option between groups
                for holder in parser._action_groups:
                    if action in holder._group_actions:
                        holder._group_actions.remove(action)
                group._group_actions.append(action)
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"Turn off --{action.dest}."
    return parser


def parse(*dataclass_types, argv=None, description: str | None = None):
    """Parse argv into the given dataclasses (only scripts' `__main__` blocks and tests call this). A --recipe
    becomes the parser's defaults, so flags given explicitly still win."""
    parser = build_parser(*dataclass_types, description=description)
    known, unknown = parser.parse_known_args(args=argv)
    if unknown:
        raise UsageError(f"unknown arguments {unknown}; see --help")
    if getattr(known, "recipe", None):
        parser.set_defaults(**RECIPES[known.recipe])
    return parser.parse_args_into_dataclasses(args=argv)


def run(main, *dataclass_types, argv=None):
    """Parse, call `main(*args)`, and turn a UsageError into one line on stderr and exit status 2 (a stop by signal
    into its exit status, a finished run's rerun into one line and exit 0). The calling script's docstring is the
    --help description."""
    if hasattr(sys.stdout, "reconfigure"):  # a real stream (not a notebook's or a test's capture)
        sys.stdout.reconfigure(line_buffering=True)  # log lines appear as they happen, also through a pipe
    try:
        arguments = parse(*dataclass_types, argv=argv, description=sys.modules[main.__module__].__doc__)
        secrets.scrub_argv(arguments)
        from . import console  # after parsing: --help and a bad flag answer before the heavy libraries load

        console.quiet_progress_bars()
        return main(*arguments)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except Stopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except Finished as finished:
        print(finished)
