"""Use what was trained: generate with base + adapter, compare held-out loss with the base, or merge the adapter.

    python generate.py --adapter outputs --prompt "Write a function that reverses a string."
    python generate.py --adapter outputs --prompts_file prompts.txt --do_sample --temperature 0.2
    python generate.py --adapter outputs --evaluate --dataset stdlib-code     # base vs base + adapter
    python generate.py --adapter outputs --merge --merged_dir merged          # a standalone model

The base defaults to the one the adapter was trained on (its adapter_config.json), quantized as in training.
Prompts are wrapped in the training format, `Question: ...\\n\\nAnswer:`. Merging loads the base unquantized
(bf16 on GPUs that have it, else fp16, fp32 on the CPU): folding LoRA into 4-bit or 8-bit weights would round the
update away, so a merged quantized model is not the model you trained.
"""

import json
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft import PeftModel

from finetune import cli, data, evaluation, modeling
from finetune.cli import UsageError


@dataclass
class GenerateArguments:
    adapter: str = field(default="./outputs", metadata={"help": "A training output directory (adapter_config.json)."})
    model: str = field(default="", metadata={"help": "Base model; default: the adapter's own base."})
    quantization: Literal["4bit", "8bit", "none"] = field(default="4bit", metadata={
        "help": "How to load the base for generation and evaluation (as in training). --merge always uses none."})
    prompt: list[str] = field(default_factory=list, metadata={"help": "Prompts (instructions) to complete."})
    prompts_file: str = field(default="", metadata={"help": "A file with one prompt per line."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens to generate per prompt."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=0.2, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling mass (with --do_sample)."})
    evaluate: bool = field(default=False, metadata={"help": "Print held-out loss/perplexity: base vs base + adapter."})
    dataset: str = field(default="stdlib-code", metadata={"help": "Data set for --evaluate (the training one)."})
    seq_length: int = field(default=512, metadata={"help": "With --evaluate: tokens per example, as in training."})
    max_eval_samples: int = field(default=64, metadata={"help": "With --evaluate: as in training."})
    seed: int = field(default=42, metadata={"help": "With --evaluate: the training seed, so the split is the same."})
    merge: bool = field(default=False, metadata={"help": "Merge the adapter into the unquantized base and save it."})
    merged_dir: str = field(default="./merged", metadata={"help": "Where --merge saves the model and tokenizer."})


def adapter_base(adapter: str) -> str:
    config_path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"{adapter!r} holds no adapter (adapter_config.json); point --adapter at a training "
                         f"output directory")
    return json.load(open(config_path))["base_model_name_or_path"]


def load_with_adapter(args: GenerateArguments, quantization: str):
    base_name = args.model or adapter_base(args.adapter)
    model = modeling.load_model(base_name, quantization)
    try:
        model = PeftModel.from_pretrained(model, args.adapter)
    except (RuntimeError, ValueError, KeyError) as error:  # shapes or module names that do not fit
        reason = str(error).strip().splitlines()[0]
        raise UsageError(f"the adapter in {args.adapter!r} was trained on {adapter_base(args.adapter)!r} and does "
                         f"not fit {base_name!r}: {reason[:200]}") from None
    return model, modeling.load_tokenizer(base_name)


def prompts(args: GenerateArguments) -> list[str]:
    lines = list(args.prompt)
    if args.prompts_file:
        lines += [line.strip() for line in open(args.prompts_file, encoding="utf-8") if line.strip()]
    return lines


@torch.no_grad()
def complete(model, tokenizer, prompt_list: list[str], args: GenerateArguments) -> list[str]:
    model.eval()
    device = next(model.parameters()).device
    completions = []
    for prompt in prompt_list:
        inputs = tokenizer(data.format_prompt(prompt), return_tensors="pt").to(device)
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                                temperature=args.temperature if args.do_sample else None,
                                top_p=args.top_p if args.do_sample else None,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        completions.append(text.removeprefix(" "))  # the space after "Answer:" belongs to the first token
    return completions


def main(args: GenerateArguments):
    if args.merge:
        model, tokenizer = load_with_adapter(args, "none")
        merged = model.merge_and_unload()
        merged.save_pretrained(args.merged_dir)
        tokenizer.save_pretrained(args.merged_dir)
        print(f"merged model and tokenizer saved to {args.merged_dir}")
        return merged
    model, tokenizer = load_with_adapter(args, args.quantization)
    if args.evaluate:
        _, eval_set = data.split(data.load_texts(args.dataset), args.max_eval_samples, args.seed)
        comparison = evaluation.compare(model, data.tokenize(eval_set, tokenizer, args.seq_length), tokenizer, 4)
        print(evaluation.describe(comparison))
        return comparison
    prompt_list = prompts(args)
    if not prompt_list:
        raise UsageError("no prompts: give --prompt TEXT or --prompts_file FILE (or --evaluate, --merge)")
    completions = complete(model, tokenizer, prompt_list, args)
    for prompt, completion in zip(prompt_list, completions):
        print(f"### {prompt}\n{completion}\n")
    return completions


if __name__ == "__main__":
    cli.run(main, GenerateArguments)
