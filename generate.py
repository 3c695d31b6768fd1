"""Use what was trained: generate with base + adapter, compare it with the base (held-out loss, HumanEval), or merge.

    python generate.py --adapter outputs --prompt "Write a function that reverses a string."
    python generate.py --adapter outputs --humaneval --humaneval_limit 20      # pass@1, base vs base + adapter

More: `--prompts_file FILE --do_sample --temperature 0.2`; `--evaluate` (held-out loss on the run's own data, from
its run_config.json, or on `--dataset`); `--merge --merged_dir merged` (a standalone model).

The base defaults to the one the adapter was trained on (its adapter_config.json), quantized as in training.
Prompts are wrapped in the training format, `Question: ...\\n\\nAnswer:`; HumanEval's prompts are code and are
completed as they are. Merging loads the base unquantized (bf16 on GPUs that have it, else fp16, fp32 on the CPU):
folding LoRA into 4-bit or 8-bit weights would round the update away, so a merged quantized model is not the model
you trained.
"""

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from finetune import checkpointing, cli, data, evaluation, humaneval, modeling
from finetune.errors import UsageError, first_line


@dataclass
class GenerateArguments:
    adapter: str = field(default="./outputs", metadata={"help": "A training output directory (adapter_config.json)."})
    model: str = field(default="", metadata={"help": "Base model; default: the adapter's own base."})
    quantization: Literal["4bit", "8bit", "none"] = field(default="4bit", metadata={
        "help": "How to load the base for generation and evaluation (as in training). --merge always uses none."})
    prompt: list[str] = field(default_factory=list, metadata={"help": "Prompts (instructions) to complete."})
    prompts_file: str = field(default="", metadata={"help": "A UTF-8 text file with one prompt per line."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens to generate per prompt."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.2, metadata={"help": "Sampling temperature (with --do_sample, or "
                                                              "--num_samples above 1)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (with sampling)."})
    evaluate: bool = field(default=False, metadata={"help": "Print held-out loss/perplexity: base vs base + adapter."})
    dataset: str = field(default="", metadata={
        "help": "Data set for --evaluate; default: the run's own (its run_config.json), with its columns."})
    seq_length: int | None = field(default=None, metadata={"help": "With --evaluate: tokens per example; default: "
                                                                   "the run's."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "With --evaluate; default: the run's."})
    seed: int | None = field(default=None, metadata={"help": "With --evaluate: the split's seed; default: the "
                                                             "run's."})
    humaneval: bool = field(default=False, metadata={
        "help": "HumanEval pass@1 (and pass@k with --num_samples) of the base and of base + adapter; per-problem "
                "results go to <adapter>/humaneval.json."})
    humaneval_limit: int = field(default=0, metadata={"help": "Only the first N problems (0: all 164)."})
    num_samples: int = field(default=1, metadata={"help": "HumanEval completions per problem: 1 is greedy; more are "
                                                          "sampled, for pass@k."})
    merge: bool = field(default=False, metadata={"help": "Merge the adapter into the unquantized base and save it."})
    merged_dir: str = field(default="./merged", metadata={"help": "Where --merge saves the model and tokenizer."})
    overwrite_merged_dir: bool = field(default=False, metadata={"help": "Replace what --merged_dir holds."})

    _help_groups = {
        "model": ("adapter", "model", "quantization"),
        "generation": ("prompt", "prompts_file", "max_new_tokens", "do_sample", "temperature", "top_p"),
        "held-out loss": ("evaluate", "dataset", "seq_length", "max_eval_samples", "seed"),
        "HumanEval": ("humaneval", "humaneval_limit", "num_samples"),
        "merge": ("merge", "merged_dir", "overwrite_merged_dir"),
    }

    def __post_init__(self):
        cli.check_positive(max_new_tokens=self.max_new_tokens, num_samples=self.num_samples)
        sampling = self.do_sample or self.num_samples > 1
        cli.require(not sampling or (math.isfinite(self.temperature) and self.temperature > 0),
                    f"--temperature must be a positive number to sample, got {self.temperature}")
        cli.require(not sampling or 0 < self.top_p <= 1, f"--top_p must be above 0 and at most 1, got {self.top_p}")
        cli.require(self.humaneval_limit >= 0, f"--humaneval_limit must be 0 (all) or more, got "
                                               f"{self.humaneval_limit}")
        cli.require(self.seq_length is None or self.seq_length >= 2, f"--seq_length must be at least 2, got "
                                                                     f"{self.seq_length}")
        cli.require(self.max_eval_samples is None or self.max_eval_samples > 0, "--max_eval_samples must be a "
                                                                                "positive integer")
        cli.require(self.seed is None or 0 <= self.seed < 2**32, "--seed must be between 0 and 2**32 - 1")
        cli.check_given(adapter=self.adapter, merged_dir=self.merged_dir)
        self.dataset = cli.local_path(self.dataset) if self.dataset else ""


def load_with_adapter(args: GenerateArguments, quantization: str):
    base_name = args.model or modeling.adapter_base(args.adapter)
    model = modeling.load_adapter(modeling.load_quantized(base_name, quantization), args.adapter, base_name)
    return model, modeling.load_tokenizer(base_name)


def prompts(args: GenerateArguments) -> list[str]:
    lines = list(args.prompt)
    if args.prompts_file:
        try:
            lines += [line.strip() for line in open(args.prompts_file, encoding="utf-8") if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"--prompts_file {args.prompts_file!r} cannot be read as UTF-8 text: "
                             f"{first_line(error)}") from None
    return lines


def run_config(args: GenerateArguments) -> dict:
    """The training run's recorded configuration (run_config.json), or {} for an adapter trained elsewhere."""
    path = Path(args.adapter) / checkpointing.RUN_CONFIG
    return json.loads(path.read_text()) if path.is_file() else {}


def wrap(prompt: str, data_format: str, tokenizer) -> str:
    """A prompt as the run trained: a Question/Answer turn, a chat-template user turn, or plain text (code)."""
    if data_format == "chat_template":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return data.format_prompt(prompt) if data_format == "question_answer" else prompt


def stop_ids(model, tokenizer) -> list[int]:
    """End-of-text and end-of-turn tokens: the tokenizer's eos and the model's generation config's (a chat model
    ends its turn with one of its own, Qwen's <|im_end|>)."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *(i for i in configured if i is not None)})


def check_lengths(args: GenerateArguments, tokenizer, prompt_list: list[str], base_name: str,
                  data_format: str) -> None:
    """Each prompt, in the training format, plus --max_new_tokens must fit the model's positions."""
    limit = modeling.position_limit(modeling.check_model(base_name, 2))
    for prompt in prompt_list if limit else []:
        needed = len(tokenizer(wrap(prompt, data_format, tokenizer), verbose=False)["input_ids"]) + args.max_new_tokens
        if needed > limit:
            raise UsageError(f"the prompt {prompt[:40]!r}... needs {needed} positions with --max_new_tokens "
                             f"{args.max_new_tokens}; the model has {limit}: shorten it or lower --max_new_tokens")


@torch.no_grad()
def complete(model, tokenizer, prompt_list: list[str], args: GenerateArguments,
             data_format: str = "question_answer") -> list[str]:
    model.eval()
    device = next(model.parameters()).device
    completions = []
    for prompt in prompt_list:
        inputs = tokenizer(wrap(prompt, data_format, tokenizer), return_tensors="pt").to(device)
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                temperature=args.temperature if args.do_sample else None,
                                top_p=args.top_p if args.do_sample else None,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(model, tokenizer))
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        completions.append(text.removeprefix(" "))  # the space after "Answer:" belongs to the first token
    return completions


def evaluation_data(args: GenerateArguments, run: dict) -> dict:
    """What --evaluate runs on: the training run's data, split and lengths (its run_config.json), overridden by the
    flags given; without a run_config.json, --dataset is needed."""
    if not args.dataset and not run:
        raise UsageError(f"{args.adapter!r} has no {checkpointing.RUN_CONFIG} naming its data; give --dataset")
    own = not args.dataset or args.dataset == run.get("dataset")
    chosen = {"dataset": args.dataset or run["dataset"],
              "prompt_column": run.get("prompt_column", "prompt") if own else "prompt",
              "completion_column": run.get("completion_column", "completion") if own else "completion",
              "completion_only_loss": run.get("completion_only_loss") if own else None,
              **{key: run.get(key, default) if own else default
                 for key, default in (("dataset_split", "train"), ("eval_dataset", ""), ("eval_split", ""))}}
    for name, default in (("seq_length", 512), ("max_eval_samples", 64), ("seed", 42)):
        chosen[name] = getattr(args, name) if getattr(args, name) is not None else run.get(name, default)
    return chosen


def merge(args: GenerateArguments):
    """The adapter folded into the unquantized base, written beside --merged_dir and renamed into place, so a
    failure leaves --merged_dir as it was; a directory that holds something is replaced only when asked."""
    target = Path(args.merged_dir).absolute()
    if target.exists() and not target.is_dir():
        raise UsageError(f"--merged_dir {args.merged_dir!r} is a file; give a directory")
    if target.is_dir() and any(target.iterdir()) and not args.overwrite_merged_dir:
        raise UsageError(f"--merged_dir {args.merged_dir!r} is not empty; use another, or --overwrite_merged_dir")
    checkpointing.check_output_dir(str(target.parent))
    model, tokenizer = load_with_adapter(args, "none")
    merged = model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            previous = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, previous / "merged")
            os.rename(staging, target)
            shutil.rmtree(previous)
        else:
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"merged model and tokenizer saved to {target}")
    return merged


def main(args: GenerateArguments):
    base_name = args.model or modeling.adapter_base(args.adapter)
    if args.merge:
        return merge(args)
    prompt_list = prompts(args)
    if not (prompt_list or args.evaluate or args.humaneval):
        raise UsageError("nothing to do: give --prompt TEXT or --prompts_file FILE, or --evaluate, --humaneval, "
                         "--merge")
    run = run_config(args)
    data_format = run.get("data_format", "question_answer")
    tokenizer = modeling.load_tokenizer(base_name)
    held_out = None
    if args.evaluate:
        chosen = evaluation_data(args, run)
        train_examples, eval_examples, eval_format = data.load_splits(
            chosen["dataset"], chosen["prompt_column"], chosen["completion_column"], tokenizer, None,
            chosen["max_eval_samples"], chosen["seed"], chosen["dataset_split"], chosen["eval_dataset"],
            chosen["eval_split"])
        completion_only = (data.has_prompts(train_examples) if chosen["completion_only_loss"] is None
                           else chosen["completion_only_loss"])
        held_out = data.tokenize(eval_examples, tokenizer, chosen["seq_length"], completion_only=completion_only,
                                 append_eos=eval_format != "chat_template")
        data.check_labels(held_out, "held-out examples", chosen["seq_length"])
    check_lengths(args, tokenizer, prompt_list, base_name, data_format)
    model, tokenizer = load_with_adapter(args, args.quantization)
    results = {}
    if held_out is not None:
        results["evaluation"] = evaluation.compare(model, held_out, tokenizer, 4)
        print(f"{chosen['dataset']}: {evaluation.describe(results['evaluation'])}")
    if args.humaneval:
        results["humaneval"] = humaneval.compare(model, tokenizer, args.adapter, args.humaneval_limit,
                                                 args.num_samples, args.temperature, args.top_p)
        scores = {key: value for key, value in results["humaneval"].items() if "pass@" in key}
        print(f"HumanEval ({results['humaneval']['humaneval_problems']} problems, {args.num_samples} sample(s) "
              f"each): " + ", ".join(f"{key.removeprefix('humaneval_')} {value:.1%}" for key, value in scores.items())
              + f"; per problem: {os.path.join(args.adapter, 'humaneval.json')}")
    if prompt_list:
        results["completions"] = complete(model, tokenizer, prompt_list, args, data_format)
        for prompt, completion in zip(prompt_list, results["completions"]):
            print(f"### {prompt}\n{completion}\n")
    return results


if __name__ == "__main__":
    cli.run(main, GenerateArguments)
