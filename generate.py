"""Use what was trained: generate with base + adapter, fill in the middle as an editor asks, compare the adapter with
the base (held-out loss, HumanEval, HumanEval infilling), or merge it into a standalone model.

    python generate.py --adapter outputs --prompt "Write a function that reverses a string."
    python generate.py --adapter outputs --prefix "def add(a, b):\n    " --suffix "\n    return c\n"   # infilling

More: `--prompts_file FILE --do_sample --temperature 0.2`; `--evaluate` (held-out loss on the run's own data, from
its run_config.json, or on `--dataset`); `--humaneval`, `--humaneval_infilling` (`--humaneval_limit N`);
`--merge --merged_dir merged` (a standalone model).

The base defaults to the one the adapter was trained on (its adapter_config.json), quantized as in training.
Prompts are wrapped as the run trained: `Question: ...\n\nAnswer:`, the tokenizer's chat template for a run on
conversations, or as they are for a run on code; HumanEval's prompts are code and are completed as they are.
Infilling (`--prefix`/`--suffix`, or `--prefix_file`/`--suffix_file`) prints the base's middle beside the
adapter's. Merging loads the base unquantized (bf16 on GPUs that have it, else fp16, fp32 on the CPU): folding LoRA
into 4-bit or 8-bit weights would round the update away, so a merged quantized model is not the model you trained.
"""

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from finetune import cli
from finetune.errors import UsageError


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
    prefix: str = field(default="", metadata={"help": "Code before the cursor: fill in the middle (with --suffix)."})
    suffix: str = field(default="", metadata={"help": "Code after the cursor."})
    prefix_file: str = field(default="", metadata={"help": "A UTF-8 file holding the code before the cursor."})
    suffix_file: str = field(default="", metadata={"help": "A UTF-8 file holding the code after the cursor."})
    evaluate: bool = field(default=False, metadata={"help": "Print held-out loss/perplexity: base vs base + adapter."})
    dataset: str = field(default="", metadata={
        "help": "Data set for --evaluate; default: the run's own (its run_config.json), with its columns."})
    prompt_column: str = field(default="", metadata={"help": "With --dataset: its prompt column (default: prompt)."})
    completion_column: str = field(default="", metadata={"help": "With --dataset: its completion column (default: "
                                                                 "completion)."})
    seq_length: int | None = field(default=None, metadata={"help": "With --evaluate: tokens per example; default: "
                                                                   "the run's."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "With --evaluate; default: the run's."})
    seed: int | None = field(default=None, metadata={"help": "With --evaluate: the split's seed; default: the "
                                                             "run's."})
    humaneval: bool = field(default=False, metadata={
        "help": "HumanEval pass@1 (and pass@k with --num_samples) of the base and of base + adapter; per-problem "
                "results go to <adapter>/humaneval.json."})
    humaneval_infilling: bool = field(default=False, metadata={
        "help": "HumanEval single-line infilling pass@1 (each canonical solution line masked in turn; Fried et al. "
                "2022) of the base and of base + adapter; per-task results go to <adapter>/humaneval_infilling.json."})
    humaneval_limit: int = field(default=0, metadata={"help": "Only the first N problems (0: all 164)."})
    num_samples: int = field(default=1, metadata={"help": "HumanEval completions per problem: 1 is greedy; more are "
                                                          "sampled, for pass@k."})
    merge: bool = field(default=False, metadata={"help": "Merge the adapter into the unquantized base and save it."})
    merged_dir: str = field(default="./merged", metadata={"help": "Where --merge saves the model and tokenizer."})
    overwrite_merged_dir: bool = field(default=False, metadata={"help": "Replace what --merged_dir holds."})

    # What a task's settings act on: given without it, they would do nothing
    _SETTINGS_OF = ((("evaluate",), ("dataset", "seq_length", "max_eval_samples", "seed")),
                    (("humaneval", "humaneval_infilling"), ("humaneval_limit",)),
                    (("humaneval",), ("num_samples",)),  # completions per problem; infilling decodes one
                    (("merge",), ("merged_dir", "overwrite_merged_dir")))

    _help_groups = {
        "model": ("adapter", "model", "quantization"),
        "generation": ("prompt", "prompts_file", "max_new_tokens", "do_sample", "temperature", "top_p"),
        "infilling": ("prefix", "suffix", "prefix_file", "suffix_file"),
        "held-out loss": ("evaluate", "dataset", "prompt_column", "completion_column", "seq_length",
                          "max_eval_samples", "seed"),
        "HumanEval": ("humaneval", "humaneval_infilling", "humaneval_limit", "num_samples"),
        "merge": ("merge", "merged_dir", "overwrite_merged_dir"),
    }

    def __post_init__(self):
        cli.check_counts(max_new_tokens=self.max_new_tokens, num_samples=self.num_samples)
        sampling = self.do_sample or self.num_samples > 1
        cli.require(not sampling or (math.isfinite(self.temperature) and self.temperature > 0),
                    f"--temperature must be a positive number to sample, got {self.temperature}")
        cli.require(not sampling or 0 < self.top_p <= 1, f"--top_p must be above 0 and at most 1, got {self.top_p}")
        cli.require(0 <= self.humaneval_limit <= cli.HUMANEVAL_PROBLEMS,
                    f"--humaneval_limit must be 0 (all {cli.HUMANEVAL_PROBLEMS} problems) to "
                    f"{cli.HUMANEVAL_PROBLEMS}, got {self.humaneval_limit}")
        cli.require(self.seq_length is None or self.seq_length >= 2, f"--seq_length must be at least 2, got "
                                                                     f"{self.seq_length}")
        if self.max_eval_samples is not None:
            cli.check_counts(max_eval_samples=self.max_eval_samples)
        cli.require(self.seed is None or 0 <= self.seed < 2**32, "--seed must be between 0 and 2**32 - 1")
        cli.check_given(adapter=self.adapter, merged_dir=self.merged_dir)
        cli.require(all(prompt.strip() for prompt in self.prompt), "--prompt holds an empty prompt; give each prompt "
                                                                   "some text")
        cli.require(not (self.prefix and self.prefix_file) and not (self.suffix and self.suffix_file),
                    "give the code around the cursor as text (--prefix/--suffix) or as files (--prefix_file/"
                    "--suffix_file), not both")
        cli.require(not ((self.prompt_column or self.completion_column) and not self.dataset),
                    "--prompt_column and --completion_column name --dataset's columns; give --dataset too")
        cli.require(self.num_samples == 1 or not self.humaneval_infilling,
                    "--humaneval_infilling decodes greedily (pass@1); leave --num_samples at 1")
        for tasks, settings in self._SETTINGS_OF:
            given = [f"--{name}" for name in settings if getattr(self, name) != self.__dataclass_fields__[name].default]
            task = " or ".join(f"--{name}" for name in tasks)
            cli.require(not given or any(getattr(self, name) for name in tasks),
                        f"{' and '.join(given)} {'act' if len(given) > 1 else 'acts'} with {task}, which is not "
                        f"given: give {task} too, or leave out {' and '.join(given)}")
        cli.require(not (self.merge and self.tasks), f"--merge saves the merged model and does nothing else; give "
                                                     f"{', '.join(self.tasks)} in another command")
        self.dataset = cli.local_path(self.dataset) if self.dataset else ""

    @property
    def tasks(self) -> list[str]:
        """What was asked of the adapter besides a merge, as the flags that asked."""
        return [flag for flag, given in (("--prompt", self.prompt), ("--prompts_file", self.prompts_file),
                                         ("--prefix/--suffix", self.infilling), ("--evaluate", self.evaluate),
                                         ("--humaneval", self.humaneval),
                                         ("--humaneval_infilling", self.humaneval_infilling)) if given]

    @property
    def infilling(self) -> bool:
        return bool(self.prefix or self.suffix or self.prefix_file or self.suffix_file)

    @property
    def sampling(self) -> dict:
        """Generation's decoding: greedy, or sampled at --temperature and --top_p."""
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p) if self.do_sample else {}


def evaluation_data(args: GenerateArguments, run: dict) -> dict:
    """What --evaluate runs on: the training run's data, split and lengths (its run_config.json), overridden by the
    flags given; without a run_config.json, --dataset is needed."""
    if not args.dataset and not run:
        raise UsageError(f"{args.adapter!r} has no run_config.json naming its data; give --dataset")
    own = not args.dataset or args.dataset == run.get("dataset")
    chosen = {"dataset": args.dataset or run["dataset"],
              "prompt_column": args.prompt_column or (run.get("prompt_column", "prompt") if own else "prompt"),
              "completion_column": args.completion_column or (run.get("completion_column", "completion") if own
                                                              else "completion"),
              "completion_only_loss": run.get("completion_only_loss") if own else None,
              "fingerprint": run.get("data_fingerprint") if own and not args.prompt_column else None,
              **{key: run.get(key, default) if own else default
                 for key, default in (("dataset_split", "train"), ("eval_dataset", ""), ("eval_split", ""))}}
    for name, default in (("seq_length", 512), ("max_eval_samples", 64), ("seed", 42)):
        chosen[name] = getattr(args, name) if getattr(args, name) is not None else run.get(name, default)
    return chosen


def held_out_set(args: GenerateArguments, run: dict, tokenizer, limit: int | None):
    """The tokenized held-out examples --evaluate runs on, checked before the model loads: within the model's
    positions, keeping tokens to evaluate, and (for the run's own data) the data it trained on."""
    from finetune import data

    chosen = evaluation_data(args, run)
    if limit and chosen["seq_length"] > limit:
        raise UsageError(f"--seq_length {chosen['seq_length']} is above the model's maximum of {limit} positions")
    train_examples, eval_examples, eval_format, digest = data.load_splits(
        chosen["dataset"], chosen["prompt_column"], chosen["completion_column"], tokenizer, None,
        chosen["max_eval_samples"], chosen["seed"], chosen["dataset_split"], chosen["eval_dataset"],
        chosen["eval_split"])
    if chosen["fingerprint"] and digest != chosen["fingerprint"]:
        raise UsageError(f"{chosen['dataset']!r} changed since the run trained on it (its content's digest "
                         f"{chosen['fingerprint']} is now {digest}): its held-out split would mix in training "
                         f"examples; restore the data, or evaluate on other data with --dataset")
    completion_only = (data.has_prompts(train_examples) if chosen["completion_only_loss"] is None
                       else chosen["completion_only_loss"])
    held_out = data.tokenize(eval_examples, tokenizer, chosen["seq_length"], completion_only=completion_only,
                             append_eos=eval_format != "chat_template")
    data.check_labels(held_out, "held-out examples", chosen["seq_length"])
    return chosen["dataset"], held_out


def main(args: GenerateArguments):
    # The libraries load once the arguments are valid, so --help and a mistyped flag answer at once.
    from finetune import evaluation, files, fim, humaneval, inference, modeling

    base_name = args.model or modeling.adapter_base(args.adapter)
    modeling.check_adapter(args.adapter)
    if args.merge:
        target = inference.check_merged_dir(args.merged_dir, args.adapter, args.overwrite_merged_dir)
        return inference.merge(args.adapter, base_name, target)
    from_file = inference.read_lines(args.prompts_file, "--prompts_file") if args.prompts_file else []
    if args.prompts_file and not from_file:
        raise UsageError(f"--prompts_file {args.prompts_file!r} holds no prompt; write one prompt per line")
    prompts = list(args.prompt) + from_file
    prefix = inference.read_text(args.prefix_file, "--prefix_file") if args.prefix_file else args.prefix
    suffix = inference.read_text(args.suffix_file, "--suffix_file") if args.suffix_file else args.suffix
    if not args.tasks:  # an empty --prompts_file was refused above
        raise UsageError("nothing to do: give --prompt TEXT or --prompts_file FILE, --prefix/--suffix, or "
                         "--evaluate, --humaneval, --humaneval_infilling, --merge")
    run = inference.run_config(args.adapter)
    data_format = run.get("data_format", "question_answer")
    tokenizer = modeling.load_tokenizer(base_name)
    limit = modeling.position_limit(modeling.check_model(base_name, 2))
    fim_tokens = fim.tokens(tokenizer, base_name) if args.infilling or args.humaneval_infilling else None
    if args.humaneval or args.humaneval_infilling:  # results are written into the adapter's directory at the end
        why = files.writable(args.adapter)
        if why:
            raise UsageError(f"HumanEval's per-problem results go to {args.adapter!r}, which cannot be written "
                             f"({why})")
    evaluated = held_out_set(args, run, tokenizer, limit) if args.evaluate else None
    inference.check_fits([inference.wrap(prompt, data_format, tokenizer) for prompt in prompts]
                         + ([prefix + suffix] if args.infilling else []), tokenizer, args.max_new_tokens, limit)

    model, tokenizer = inference.load_with_adapter(args.adapter, base_name, args.quantization)
    results = {}
    if evaluated is not None:
        name, held_out = evaluated
        results["evaluation"] = evaluation.compare(model, held_out, tokenizer, 4)
        print(f"{name}: {evaluation.describe(results['evaluation'], len(held_out))}")
    if args.humaneval:
        results["humaneval"] = humaneval.compare(model, tokenizer, args.adapter, args.humaneval_limit,
                                                 args.num_samples, args.temperature, args.top_p)
        print(humaneval.describe(results["humaneval"], os.path.join(args.adapter, humaneval.RESULTS)))
    if args.humaneval_infilling:
        results["humaneval_infilling"] = humaneval.compare_infilling(model, tokenizer, fim_tokens, args.adapter,
                                                                     args.humaneval_limit)
        print(humaneval.describe(results["humaneval_infilling"],
                                 os.path.join(args.adapter, humaneval.INFILLING_RESULTS)))
    if prompts:
        results["completions"] = inference.complete(model, tokenizer, prompts, data_format, args.max_new_tokens,
                                                    args.sampling)
        for prompt, completion in zip(prompts, results["completions"]):
            print(f"### {prompt}\n{completion}\n")
    if args.infilling:
        with model.disable_adapter():
            base = inference.infill(model, tokenizer, fim_tokens, prefix, suffix, args.max_new_tokens)
        adapted = inference.infill(model, tokenizer, fim_tokens, prefix, suffix, args.max_new_tokens)
        results["infilling"] = {"base": base, "adapter": adapted}
        print(f"### middle, base\n{base}\n### middle, base + adapter\n{adapted}")
    return results


if __name__ == "__main__":
    cli.run(main, GenerateArguments)


