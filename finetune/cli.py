"""The command line every training script shares: its arguments, checked where they enter, and the recipes.

Bad input never reaches training: each dataclass checks its own values in `__post_init__` (as transformers'
run_clm.py does), and `run` turns a UsageError into one `error: ...` line and exit status 2.
"""

import argparse
import math
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from . import environment, secrets
from .errors import Finished, Stopped, UsageError, WriteFailed

# Schedules the Trainer names (transformers.SchedulerType), those that need no extra arguments.
SCHEDULERS = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
                     "inverse_sqrt"]
LOCAL_DATA_FORMATS = (".json", ".jsonl", ".csv", ".parquet")


DEFAULT_STEPS = 60
MAX_COUNT = 10**9  # no run takes a billion steps, batches or examples: a larger count is a typo
DAY = 86400
HUMANEVAL_PROBLEMS = 164


def check_positive(**values) -> None:
    for name, value in values.items():
        if not value > 0:
            raise UsageError(f"--{name} must be a positive integer, got {value}")


def check_counts(**values) -> None:
    """Positive integers, at most a billion."""
    check_positive(**values)
    for name, value in values.items():
        if value > MAX_COUNT:
            raise UsageError(f"--{name} must be at most {MAX_COUNT:,}, got {value}")


def check_repo_id(repo_id: str) -> None:
    """A Hub repository id, `namespace/name` or `name`, in the characters the Hub allows."""
    import re

    if not re.fullmatch(r"([\w.-]{1,96}/)?[\w.-]{1,96}", repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise UsageError(f"--hub_model_id {repo_id!r} is not a Hub repository id: give namespace/name in letters, "
                         f"digits, '-', '_' and '.'")


def _listed(phrases) -> str:
    """`a`, `a and b`, `a, b and c` (and nothing of none)."""
    phrases = list(phrases)
    return " and ".join(filter(None, [", ".join(phrases[:-1]), *phrases[-1:]]))


def _flag(name: str, value) -> str:
    """A setting as it is typed: a true boolean as the bare flag."""
    if value is True:
        return f"--{name}"
    return f"--{name} {str(value).lower() if isinstance(value, bool) else value}"


def check_given(**values: str) -> None:
    for name, value in values.items():
        if not value.strip():
            raise UsageError(f"--{name} must not be empty")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def local_path(value: str) -> str:
    """A path that exists here (or names a local data file) made absolute, so `data/x.jsonl` and its absolute form
    are the same run; several comma-separated paths and globs each so; a Hub id is kept as it is."""
    if "," in value:
        return ",".join(local_path(part) for part in value.split(",") if part)
    if os.path.exists(value) or value.lower().endswith(LOCAL_DATA_FORMATS) or value.startswith(("./", "../")) \
            or any(c in value for c in "*?["):  # a glob of source trees
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
    extensions: str = field(default="", metadata={
        "help": "With a source tree as --dataset: the files to train on, as extensions or languages "
                "(`.py,.pyi` or `python,rust`); default: every text file."})
    max_file_bytes: int = field(default=1_000_000, metadata={
        "help": "With a source tree: files larger than this are skipped (The Stack's limit, 1 MB)."})
    fim_rate: float | None = field(default=None, metadata={
        "help": "Share of code examples trained in fill-in-the-middle form (the form editors complete in); default: "
                "0.5 (bigcode's and the personal-copilot recipe's) for code (text and source-tree data) when the "
                "tokenizer has FIM tokens, else 0."})
    fim_spm_rate: float = field(default=0.5, metadata={
        "help": "Of the FIM examples, the share in suffix-prefix-middle order (the rest prefix-suffix-middle)."})
    fim_loss: Literal["all", "middle"] = field(default="all", metadata={
        "help": "FIM examples train on every token (all), or on the middle and the end-of-text token only."})
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
    max_train_steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps to train; default: 60, or --num_train_epochs' worth. Raised on a finished run, it "
                "trains on for the added steps with a schedule of their own (README)."})
    num_train_epochs: float | None = field(default=None, metadata={
        "help": "Passes over the training data, as steps (data / effective batch, per pass); --max_train_steps "
                "wins when both are given."})
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
    recipe: Literal["fast", "fp8", "bf16", "long", "fp8_lean", "lean", "lean_fp8", "qlora", "tutorial"] | None = field(
        default=None, metadata={
        "help": "Preset flags (explicit flags still win): fast = packed 4 x 2048; fp8 = fast with the base in FP8; "
                "bf16 = fast with the base unquantized in bf16 (80 GB cards without FP8: A100); "
                "long = whole files at StarCoder's full 8,192 tokens, 1 per batch, FP8 base (StarCoder2's 16,384: "
                "add --seq_length 16384 --gradient_checkpointing); fp8_lean = FP8 base, packed 2 x 2048 with "
                "checkpointing (StarCoder-15B on a 24 GB card with FP8: RTX 4090, L4, L40S); lean = packed 2 x 2048 "
                "with checkpointing, the checkpointed layers' inputs in CPU memory (StarCoder-15B in 10.2 GiB with "
                "every layer checkpointed, H100, 2026-12-07); lean_fp8 = lean with FP8 matmuls (a 16 GB card with "
                "FP8: RTX 4060 Ti 16 GB, 4080, 5080; 1.47x lean within 11.5 GiB on an H100, 2026-12-07, "
                "docs/PERFORMANCE.md); these three checkpoint only the layers the GPU needs (--checkpointed_layers "
                "fit); qlora = the common QLoRA recipe; tutorial = the tutorial's 8-bit fp16 set-up. See "
                "docs/PERFORMANCE.md."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass: less memory, about a quarter slower."})
    checkpointed_layers: str = field(default="all", metadata={
        "help": "With --gradient_checkpointing, which decoder layers recompute their activations: all; a number n, "
                "the first n, the rest keep theirs and skip the recompute; or fit, the fewest that let the run fit "
                "the GPU's memory less 1 GiB by finetune/memory.py's estimate (all on the CPU)."})
    offloaded_layers: int = field(default=0, metadata={
        "help": "With --gradient_checkpointing, how many of the checkpointed layers, spread among them, keep their "
                "activations in CPU memory instead of recomputing them (finetune/offload.py): copied out and back "
                "over PCIe beside the compute. Saves memory, not time: StarCoder-15B's lean at 1 x 2048 with all 40 "
                "offloaded used 0.9 GiB less and ran 1.9%% slower (H100, 2026-12-07, docs/PERFORMANCE.md). GPUs "
                "only: on the CPU they stay checkpointed."})
    offload_layer_inputs: bool = field(default=False, metadata={
        "help": "With --gradient_checkpointing, each checkpointed layer keeps the input it recomputes from in pinned "
                "CPU memory instead of the GPU's, copied out and back beside the compute (finetune/offload.py; "
                "Unsloth's offloaded checkpointing): 2 bytes x hidden size a token and layer, 0.94 GiB for "
                "StarCoder-15B's 40 layers at 1 x 2,048, for a larger batch within the same memory (the lean "
                "recipes: 2 x 2048)."})
    fp32_upcast: bool = field(default=False, metadata={
        "help": "Keep fp32 copies of norms, embeddings and LM head (peft's prepare_model_for_kbit_training): the "
                "classic QLoRA set-up; slower and larger, and bf16 norms train fine (docs/PERFORMANCE.md)."})
    fp32_adapter: bool = field(default=False, metadata={
        "help": "LoRA weights in fp32 (peft's default) instead of the compute dtype: casts every adapted layer's "
                "input, about 15%% slower on StarCoder-15B. Always on with fp16, whose loss scaler needs fp32."})
    mixed_precision: bool = field(default=False, metadata={
        "help": "Run under autocast. Off: a bf16 model computes in bf16 throughout, with no casts around "
                "bitsandbytes layers (fp16 always uses autocast with a loss scaler)."})
    fuse_lora: bool = field(default=True, metadata={
        "help": "Each LoRA layer as one computation with its base, and projections that read the same input "
                "(q/k/v, gate/up) over an FP8 base as one, and the MLP's GELU in the pass that quantizes its output "
                "(finetune/fusion.py): the same sums in fewer passes; where a run would not fit otherwise, the GELU's "
                "output is recomputed in the backward instead of kept (15 GiB less for StarCoder-15B at 4 x 2048; "
                "docs/PERFORMANCE.md). With --gradient_checkpointing (layers not compiled) the recompute skips the "
                "MLP's down projection, whose output the backward never reads (13%% faster for --recipe lean within "
                "11.5 GiB; H100, 2026-12-07, docs/PERFORMANCE.md)."})
    fp8_matmuls: bool = field(default=False, metadata={
        "help": "With --quantization 4bit: multiply the NF4 base on FP8 tensor cores (compute capability 8.9+), each "
                "weight unpacked to e4m3 with a scale per row as it is used (one kernel), where --quantization fp8 "
                "would store it in 8 bits; on the fused path only (--fuse_lora, no dropout, autocast or fp32 "
                "adapter)."})
    compile_layers: bool = field(default=False, metadata={
        "help": "torch.compile each decoder layer (GPUs only), fusing the elementwise work around the GEMMs; the "
                "first steps pay the compilation."})
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
    humaneval_infilling: bool = field(default=False, metadata={
        "help": "At the end, HumanEval single-line infilling pass@1 of the base and of base + adapter."})
    humaneval_limit: int = field(default=0, metadata={"help": "With --humaneval or --humaneval_infilling: only the "
                                                              "first N problems (0: all 164)."})
    # The Hub
    push_to_hub: bool = field(default=False, metadata={
        "help": "At the end of a finished run, upload the adapter folder (adapter, tokenizer, model card) to the "
                "Hub; needs a token with write access ($HF_TOKEN)."})
    hub_model_id: str = field(default="", metadata={
        "help": "The Hub repository to upload to, `namespace/name`; default: the output directory's name in your "
                "namespace."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub repository private (--no_hub_private: "
                                                              "public)."})

    _help_groups = {
        "model": ("model", "quantization", "dtype", "hf_token"),
        "data": ("dataset", "dataset_split", "eval_dataset", "eval_split", "prompt_column", "completion_column",
                 "seq_length", "packing", "packed_attention", "completion_only_loss", "max_eval_samples",
                 "extensions", "max_file_bytes"),
        "fill-in-the-middle": ("fim_rate", "fim_spm_rate", "fim_loss"),
        "LoRA": ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"),
        "training": ("batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
                     "learning_rate",
                     "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "seed",
                     "eval_steps", "logging_steps"),
        "speed": ("recipe", "gradient_checkpointing", "checkpointed_layers", "offloaded_layers", "offload_layer_inputs",
                  "fp32_upcast",
                  "fp32_adapter", "mixed_precision", "fuse_lora", "fp8_matmuls", "compile_layers", "check_memory"),
        "output and resume": ("output_dir", "resume", "overwrite_output_dir", "grace_period_seconds"),
        "W&B": ("report_to", "wandb_project"),
        "evaluation": ("humaneval", "humaneval_infilling", "humaneval_limit"),
        "the Hub": ("push_to_hub", "hub_model_id", "hub_private"),
    }

    def __post_init__(self):
        check_given(model=self.model, dataset=self.dataset, output_dir=self.output_dir,
                    prompt_column=self.prompt_column, completion_column=self.completion_column,
                    wandb_project=self.wandb_project, dataset_split=self.dataset_split)
        # the names W&B refuses (wandb_settings.validate_project), refused here before anything is written
        require(len(self.wandb_project) <= 128 and not set(self.wandb_project) & set("/\\#?%:"),
                f"--wandb_project {self.wandb_project!r}: W&B takes at most 128 characters, none of / \\ # ? % :")
        if self.max_train_steps is None and self.num_train_epochs is None:
            self.max_train_steps = DEFAULT_STEPS
        # Every count bounded by what it means; the data and the model bound batch, rank and length once known.
        check_counts(batch_size=self.batch_size, lora_r=self.lora_r, eval_steps=self.eval_steps,
                     logging_steps=self.logging_steps, max_eval_samples=self.max_eval_samples,
                     gradient_accumulation_steps=self.gradient_accumulation_steps,
                     **({"max_train_steps": self.max_train_steps} if self.max_train_steps is not None else {}))
        require(self.num_train_epochs is None or (math.isfinite(self.num_train_epochs)
                                                  and 0 < self.num_train_epochs <= MAX_COUNT),
                f"--num_train_epochs must be a positive number, got {self.num_train_epochs}")
        for name in ("fim_rate", "fim_spm_rate"):
            value = getattr(self, name)
            require(value is None or (math.isfinite(value) and 0 <= value <= 1),
                    f"--{name} must be a share, 0 to 1, got {value}")
        check_counts(max_file_bytes=self.max_file_bytes)
        if self.push_to_hub and self.hub_model_id:
            check_repo_id(self.hub_model_id)
        require(self.grace_period_seconds <= DAY, f"--grace_period_seconds must be at most {DAY} (a day), got "
                                                  f"{self.grace_period_seconds}")
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
        require(self.warmup_steps is None or 0 <= self.warmup_steps <= (self.max_train_steps or MAX_COUNT),
                f"--warmup_steps must be 0 to --max_train_steps, got {self.warmup_steps}")
        require(self.warmup_ratio is None or 0 <= self.warmup_ratio < 1, f"--warmup_ratio must be at least 0 and "
                                                                          f"below 1, got {self.warmup_ratio}")
        require(0 <= self.humaneval_limit <= HUMANEVAL_PROBLEMS, f"--humaneval_limit must be 0 (all "
                                                                 f"{HUMANEVAL_PROBLEMS} problems) to "
                                                                 f"{HUMANEVAL_PROBLEMS}, got {self.humaneval_limit}")
        layers = self.checkpointed_layers = self.checkpointed_layers.strip()
        require(layers in ("all", "fit") or re.fullmatch("[0-9]{1,6}", layers) is not None,
                f"--checkpointed_layers must be all, fit or a number of layers, got {layers!r}")
        require(0 <= self.offloaded_layers <= MAX_COUNT, f"--offloaded_layers must be a number of layers, 0 or more, "
                                                         f"got {self.offloaded_layers}")
        for acted_on, switches, idle in self._ACTING_THROUGH:
            acting = {name: off for name, off in idle.items() if getattr(self, name) != off}
            if acting and not any(getattr(self, name) for name in switches):
                raise UsageError(f"{self.named(*acting)} {'act' if len(acting) > 1 else 'acts'} on {acted_on}: "
                                 f"{self.ways_to(**{switches[0]: True})}, or {self.ways_to(**acting)}")
        on_checkpointed = {name: off for name, off in self._ON_CHECKPOINTED.items() if getattr(self, name) != off}
        for name in ("offloaded_layers", "offload_layer_inputs"):
            if self.compile_layers and name in on_checkpointed:
                raise UsageError(f"{self.named(name)} is not built for compiled layers: "
                                 f"{self.ways_to(compile_layers=False)}, or "
                                 f"{self.ways_to(**{name: on_checkpointed[name]})}")
        if self.fp8_off and self.dtype not in ("auto", "bfloat16"):
            raise UsageError(f"{self.named(*self.fp8_off)} computes in bf16 (FP8 matmuls write bf16), not "
                             f"{self.named('dtype')}: {self.ways_to(dtype='auto')}")
        if self.fp8_matmuls:
            require(self.quantization == "4bit",
                    f"{self.named('fp8_matmuls')} multiplies a 4-bit base in FP8, and {self.named('quantization')} is "
                    f"not 4-bit: {self.ways_to(quantization='4bit')}, or {self.ways_to(fp8_matmuls=False)} "
                    f"(--quantization fp8 multiplies in FP8 without it)")
            off_path = self.off_fused_path
            if off_path:
                raise UsageError(f"{self.named('fp8_matmuls')} runs on the fused LoRA path, and "
                                 f"{self.named(*off_path)} {'take' if len(off_path) > 1 else 'takes'} the layers off "
                                 f"it: {self.ways_to(**off_path)}, or {self.ways_to(fp8_matmuls=False)}")
        self.model = local_path(self.model)
        self.dataset = local_path(self.dataset)
        self.eval_dataset = local_path(self.eval_dataset) if self.eval_dataset.strip() else ""

    # The settings that act on the layers --gradient_checkpointing checkpoints, with the values that do nothing
    _ON_CHECKPOINTED = dict(checkpointed_layers="all", offloaded_layers=0, offload_layer_inputs=False)
    # Settings that act only through others: what they act on, the settings that turn it on (any one), and the
    # settings with their values that do nothing
    _ACTING_THROUGH = (
        ("the layers --gradient_checkpointing checkpoints, and it is off", ("gradient_checkpointing",),
         _ON_CHECKPOINTED),
        ("the blocks --packing makes, and it is off", ("packing",), dict(packed_attention="per_example")),
        ("the problems --humaneval and --humaneval_infilling run, and both are off",
         ("humaneval", "humaneval_infilling"), dict(humaneval_limit=0)),
    )

    # The settings that keep adapted layers off finetune/fusion.py's one-function path, and the values that do not
    _FUSED_PATH = dict(fuse_lora=True, lora_dropout=0, mixed_precision=False, fp32_adapter=False, fp32_upcast=False)

    @property
    def fp8_off(self) -> dict:
        """The setting that multiplies in FP8, with the value that would not ({} where nothing does): --quantization
        fp8 (4-bit instead), else --fp8_matmuls."""
        if self.quantization == "fp8":
            return dict(quantization="4bit")
        return dict(fp8_matmuls=False) if self.fp8_matmuls else {}

    @property
    def off_fused_path(self) -> dict:
        """The settings of `_FUSED_PATH` that keep the adapted layers off it, each with the value that would not."""
        return {name: value for name, value in self._FUSED_PATH.items() if getattr(self, name) != value}

    @property
    def takes_fused_path(self) -> bool:
        """Whether the adapted layers take finetune/fusion.py's one-function path (_LoraLinear), where a down projection
        after a tanh GELU can recompute the GELU's output and a 4-bit base can multiply in FP8: what its layers check
        as they run, asked of the settings before the model loads."""
        return self.quantization != "8bit" and not self.off_fused_path

    def _untyped(self, name: str):
        """A setting's value where the user does not type it: the recipe's, else the default."""
        return RECIPES.get(self.recipe, {}).get(name, self.__dataclass_fields__[name].default)

    def named(self, *names: str) -> str:
        """Settings as a refusal names them, with the recipe that set those whose value is the recipe's: a user who
        typed `--recipe lean --compile_layers` never typed --offload_layer_inputs."""
        by_recipe = [name for name in names
                     if name in RECIPES.get(self.recipe, {}) and getattr(self, name) == self._untyped(name)]
        typed = [_flag(name, getattr(self, name)) for name in names if name not in by_recipe]
        set_by = [f"{_listed(_flag(name, getattr(self, name)) for name in by_recipe)} (--recipe {self.recipe} sets "
                  f"{'them' if len(by_recipe) > 1 else 'it'})"] if by_recipe else []
        return " and ".join(([_listed(typed)] if typed else []) + set_by)

    def ways_to(self, **values) -> str:
        """How the user gives settings these values (those they do not already have): leave out what they typed where
        the recipe or default then gives the value, replace a typed value, else set the flag: add it, or change it
        where they typed the value the recipe or default gives anyway (added, it would be refused as given twice)."""
        leave, setting, replace = [], [], []
        for name, value in values.items():
            now, untyped = getattr(self, name), self._untyped(name)
            if now == value:
                continue
            if now == untyped:
                setting.append(_flag(name, value))
            elif untyped == value:
                leave.append(_flag(name, now))
            else:
                replace.append(f"replace {_flag(name, now)} with {_flag(name, value)}")
        return _listed(([f"leave out {_listed(leave)}"] if leave else [])
                       + ([f"set {' '.join(setting)}"] if setting else []) + replace)

    @property
    def warmup(self) -> int | float:
        """The Trainer's warmup_steps: a count, or a fraction below 1."""
        if self.warmup_ratio is not None:
            return self.warmup_ratio
        return self.warmup_steps if self.warmup_steps is not None else min(10, self.max_train_steps // 10)

    def steps_for(self, examples: int, world: int) -> int:
        """The optimizer steps of --num_train_epochs over `examples` (blocks, when packed), as the Trainer counts
        them; --max_train_steps when given."""
        if self.max_train_steps is not None:
            return self.max_train_steps
        per_epoch = max(1, math.ceil(examples / (self.batch_size * world)) // self.gradient_accumulation_steps)
        return max(1, math.ceil(self.num_train_epochs * per_epoch))


# The recipes measured side by side in bench/recipes.py and docs/PERFORMANCE.md, as TrainArguments values.
_CLASSIC = dict(fp32_upcast=True, fp32_adapter=True, mixed_precision=True, lora_dropout=0.05)
RECIPES = {
    "fast": dict(batch_size=4, seq_length=2048, packing=True),
    "fp8": dict(quantization="fp8", batch_size=4, seq_length=2048, packing=True),
    # 80 GB without FP8 (A100): no dequantization; fits 4 x 2048 with the GELU recomputed (finetune/memory.py)
    "bf16": dict(quantization="none", batch_size=4, seq_length=2048, packing=True),
    "long": dict(quantization="fp8", batch_size=1, seq_length=8192, packing=True),
    # 24 GB: the FP8 base (15.1 GiB for StarCoder-15B) leaves room for 2 x 2048 with checkpointing (finetune/memory.py),
    # of fewer layers where the card has room
    "fp8_lean": dict(quantization="fp8", batch_size=2, seq_length=2048, packing=True, gradient_checkpointing=True,
                     checkpointed_layers="fit"),
    # 16 GB: the checkpointed layers' inputs in CPU memory make room for 2 x 2048, whose step no longer waits on the
    # host as 1 x 2048's does: within 11.5 GiB lean_fp8 1.17x and lean 1.09x their batch-1 speed (H100, 2026-12-07,
    # docs/PERFORMANCE.md)
    "lean": dict(batch_size=2, seq_length=2048, packing=True, gradient_checkpointing=True, checkpointed_layers="fit",
                 offload_layer_inputs=True),
    # 16 GB with FP8 tensor cores: lean's NF4 storage, its matmuls in FP8 (the base dequantized to e4m3, not bf16)
    "lean_fp8": dict(batch_size=2, seq_length=2048, packing=True, gradient_checkpointing=True,
                     checkpointed_layers="fit", offload_layer_inputs=True, fp8_matmuls=True),
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


CONFIG_FORMATS = (".yaml", ".yml", ".json")


def _unique_keys(pairs, name: str) -> dict:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise UsageError(f"{name} sets {', '.join(repeated)} twice; set each once")
    return dict(pairs)


def read_config_file(path: str) -> dict:
    """A run's settings from a YAML or JSON file: a mapping of argument names to values (keys set twice refused)."""
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"the configuration file {path!r} cannot be read: {error}") from None
    try:
        if path.lower().endswith(".json"):
            import json

            settings = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
        else:
            import yaml

            class UniqueKeys(yaml.SafeLoader):
                def construct_mapping(self, node, deep=False):
                    return _unique_keys([(self.construct_object(k, deep), self.construct_object(v, deep))
                                         for k, v in node.value], path)

            settings = yaml.load(text, Loader=UniqueKeys)
    except UsageError:
        raise
    except Exception as error:  # json and yaml raise their own types; the user needs the first line
        raise UsageError(f"the configuration file {path!r} is not valid {'JSON' if path.endswith('.json') else 'YAML'}"
                         f": {str(error).splitlines()[0][:200]}") from None
    if not isinstance(settings, dict):
        raise UsageError(f"the configuration file {path!r} must hold a mapping of argument names to values, not "
                         f"a {type(settings).__name__}")
    return settings


def _as_tokens(settings: dict, parser, path: str) -> list[str]:
    """A configuration file's settings as the command-line flags they stand for, so argparse checks their types."""
    destinations = {action.dest: action for action in parser._actions if action.option_strings}
    tokens = []
    for key, value in settings.items():
        if not isinstance(key, str) or key not in destinations:
            raise UsageError(f"{path}: unknown setting {key!r}; its keys are the arguments' names (see --help)")
        if value is None:
            continue
        if isinstance(value, dict):
            raise UsageError(f"{path}: {key} must be a value, not a mapping")
        action = destinations[key]
        if isinstance(value, list) and action.nargs is None:
            # a YAML list where the flag takes one text value is that flag's comma-separated list
            # (--lora_target_modules, --dataset, --extensions, --sweep_batch_sizes)
            if action.type is not str:
                raise UsageError(f"{path}: {key} takes one value, not a list")
            if any(isinstance(v, (list, dict)) for v in value):
                raise UsageError(f"{path}: {key}'s list must hold plain values, not lists or mappings")
            value = ",".join(str(v) for v in value)
        values = value if isinstance(value, list) else [value]
        tokens += [action.option_strings[0], *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    return tokens


def _refuse_repeats(parser, argv: list[str]) -> None:
    """A value given twice (under one spelling or two, --lora_r and --lora-r, or a flag and its --no_ form) is
    refused: the last would win silently."""
    by_flag = {flag: action.dest for action in parser._actions for flag in action.option_strings}
    given: dict[str, str] = {}
    for token in argv:
        flag = token.split("=", 1)[0]
        dest = by_flag.get(flag) if token.startswith("--") else None
        if dest is None:
            continue
        if dest in given:
            raise UsageError(f"{flag} is given twice ({given[dest]} came first); give each argument once")
        given[dest] = flag


def parse(*dataclass_types, argv=None, description: str | None = None):
    """Parse argv into the given dataclasses (only scripts' `__main__` blocks and tests call this). The first
    argument may be a YAML or JSON file of settings, which the flags after it override; a --recipe becomes the
    parser's defaults, so settings given explicitly still win."""
    parser = build_parser(*dataclass_types, description=description)
    argv = list(sys.argv[1:] if argv is None else argv)
    _refuse_repeats(parser, argv)
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_FORMATS):
        argv = _as_tokens(read_config_file(argv[0]), parser, argv[0]) + argv[1:]
    known, unknown = parser.parse_known_args(args=argv)
    if unknown:
        raise UsageError(f"unknown arguments {unknown}; see --help")
    if getattr(known, "recipe", None):
        parser.set_defaults(**RECIPES[known.recipe])
    return parser.parse_args_into_dataclasses(args=argv)


def _stop_before_training(number, frame):
    """A stop while the run loads (or evaluates, after training): nothing to save here that a rerun does not redo."""
    raise Stopped(f"stopped by {signal.Signals(number).name} before training started or after it ended; run the "
                  f"same command again to go on", 128 + number)


def run(main, *dataclass_types, argv=None):
    """Parse, check the environment, call `main(*args)`, and turn a UsageError into one line on stderr and exit
    status 2 (a write that failed into one line and exit status 1, a stop by signal into its exit status, a finished
    run's rerun into one line and exit 0). The calling script's docstring is the --help description."""
    if hasattr(sys.stdout, "reconfigure"):  # a real stream (not a notebook's or a test's capture)
        sys.stdout.reconfigure(line_buffering=True)  # log lines appear as they happen, also through a pipe
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGTERM, signal.SIGINT):  # training installs its own, which checkpoints first
            signal.signal(number, _stop_before_training)
    try:
        arguments = parse(*dataclass_types, argv=argv, description=sys.modules[main.__module__].__doc__)
        secrets.scrub_argv(arguments)
        environment.check(uses_wandb=any(getattr(a, "report_to", None) == "wandb" for a in arguments))
        from . import console  # after parsing: --help and a bad flag answer before the heavy libraries load

        console.quiet_progress_bars()
        return main(*arguments)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except WriteFailed as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except Stopped as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except Finished as finished:
        print(finished)
