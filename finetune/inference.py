"""Using a trained adapter: load it on its base, complete prompts as the run trained, fill in the middle as an editor
asks, and merge it into a standalone model. generate.py is the command line over these."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import checkpointing, data, fim, files, modeling
from .errors import UsageError, first_line

MERGE_RECORD = "merge.json"  # marks a directory that --merge wrote, so only such a directory is ever replaced
# Tokens after which an editor's completion ends: end of text, and StarCoder2's and Qwen2.5-Coder's file separators.
END_OF_MIDDLE = ("<|endoftext|>", "<file_sep>", "<|file_sep|>", "<fim_pad>", "<|fim_pad|>")


def load_with_adapter(adapter: str, base_name: str, quantization: str):
    """The base as trained (or unquantized, for merging) with the adapter on it, and the base's tokenizer."""
    model = modeling.load_adapter(modeling.load_quantized(base_name, quantization), adapter, base_name)
    return model, modeling.load_tokenizer(base_name)


def read_lines(path: str, flag: str) -> list[str]:
    try:
        return [line.strip() for line in open(path, encoding="utf-8") if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} {path!r} cannot be read as UTF-8 text: {first_line(error)}") from None


def read_text(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag} {path!r} cannot be read as UTF-8 text: {first_line(error)}") from None


def run_config(adapter: str) -> dict:
    """The training run's recorded configuration (run_config.json), or {} for an adapter trained elsewhere."""
    path = Path(adapter) / checkpointing.RUN_CONFIG
    if not (path.exists() or path.is_symlink()):
        return {}
    return files.read_json(path, "the run's recorded configuration", "restore it, or point --adapter at another "
                                                                     "training output directory")


def wrap(prompt: str, data_format: str, tokenizer) -> str:
    """A prompt as the run trained: a Question/Answer turn, a chat-template user turn, or plain text (code)."""
    if data_format == "chat_template":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return data.format_prompt(prompt) if data_format == "question_answer" else prompt


def stop_ids(model, tokenizer, extra: tuple[str, ...] = ()) -> list[int]:
    """End-of-text and end-of-turn tokens: the tokenizer's eos, the model's generation config's (a chat model ends
    its turn with one of its own, Qwen's <|im_end|>), and those of `extra` the vocabulary has."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    vocabulary = tokenizer.get_vocab()
    return sorted({tokenizer.eos_token_id, *(i for i in configured if i is not None),
                   *(vocabulary[token] for token in extra if token in vocabulary)})


def check_fits(texts: list[str], tokenizer, max_new_tokens: int, limit: int | None) -> None:
    """Each text (a wrapped prompt, an infilling context) plus --max_new_tokens must fit the model's positions."""
    for text in texts if limit else []:
        needed = len(tokenizer(text, verbose=False)["input_ids"]) + max_new_tokens
        if needed > limit:
            raise UsageError(f"the prompt {text[:40]!r}... needs {needed} positions with --max_new_tokens "
                             f"{max_new_tokens}; the model has {limit}: shorten it or lower --max_new_tokens")


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], data_format: str, max_new_tokens: int, sampling: dict) -> list[str]:
    """Each prompt, wrapped as the run trained, continued; `sampling`: {} for greedy decoding, or do_sample with its
    temperature and top_p."""
    model.eval()
    device = next(model.parameters()).device
    completions = []
    for prompt in prompts:
        inputs = tokenizer(wrap(prompt, data_format, tokenizer), return_tensors="pt").to(device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=stop_ids(model, tokenizer), **sampling)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        completions.append(text.removeprefix(" "))  # the space after "Answer:" belongs to the first token
    return completions


def infilling_ids(tokenizer, tokens: fim.FimTokens, prefix: str, suffix: str) -> list[int]:
    """An editor's request in the PSM form FIM training uses: <fim_prefix> prefix <fim_suffix> suffix <fim_middle>."""
    prefix_ids, suffix_ids = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in (prefix, suffix))
    return [*data.leading_special_ids(tokenizer), tokens.prefix, *prefix_ids, tokens.suffix, *suffix_ids,
            tokens.middle]


@torch.no_grad()
def infill(model, tokenizer, tokens: fim.FimTokens, prefix: str, suffix: str, max_new_tokens: int,
           one_line: bool = False) -> str:
    """The middle between `prefix` and `suffix`, greedy, as an editor gets it: generation stops at the end of text or
    a file separator (StarCoder2, Qwen2.5-Coder); with `one_line`, at the end of the first line too."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([infilling_ids(tokenizer, tokens, prefix, suffix)], device=device)
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=stop_ids(model, tokenizer, END_OF_MIDDLE),
                            **({"stop_strings": ["\n"], "tokenizer": tokenizer} if one_line else {}))
    middle = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    return middle[: middle.index("\n") + 1] if one_line and "\n" in middle else middle


def check_merged_dir(merged_dir: str, adapter: str, overwrite: bool) -> Path:
    """Where --merge may write: not the adapter's own directory, nor inside or around it, nor inside any training
    run's directory; a directory that holds anything is replaced only if an earlier --merge wrote it and
    --overwrite_merged_dir says so."""
    target, source = Path(merged_dir).absolute().resolve(), Path(adapter).absolute().resolve()
    if target.exists() and not target.is_dir():
        raise UsageError(f"--merged_dir {merged_dir!r} is a file; give a directory")
    if target == source or source in target.parents or target in source.parents:
        raise UsageError(f"--merged_dir {merged_dir!r} is, is inside or holds the adapter's directory {adapter!r}, "
                         f"which a merge must never replace; give a directory outside it")
    run = next((p for p in [target, *target.parents] if checkpointing.holds_run(p)), None)
    if run is not None:
        raise UsageError(f"--merged_dir {merged_dir!r} is inside the training run directory {str(run)!r}; give a "
                         f"directory outside it")
    if target.is_dir() and any(target.iterdir()):
        if not (target / MERGE_RECORD).is_file():
            raise UsageError(f"--merged_dir {merged_dir!r} holds files that --merge did not write; give an empty or "
                             f"new directory")
        if not overwrite:
            raise UsageError(f"--merged_dir {merged_dir!r} holds an earlier merge; use another, or "
                             f"--overwrite_merged_dir to replace it")
    why = files.writable(target.parent)
    if why:
        raise UsageError(f"--merged_dir {merged_dir!r} cannot be written ({why})")
    return target


def merge(adapter: str, base_name: str, target: Path):
    """The adapter folded into the unquantized base, written beside `target` and renamed into place, so a failure
    leaves `target` as it was. Loads the base unquantized: folding LoRA into 4-bit or 8-bit weights would round the
    update away."""
    model, tokenizer = load_with_adapter(adapter, base_name, "none")
    merged = model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / MERGE_RECORD).write_text(json.dumps({"adapter": str(Path(adapter).absolute()),
                                                        "base": base_name}, indent=1))
        files.share(staging)
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
