"""The embedded default: a tiny StarCoder (`tiny-starcoder`) and a code data set (`stdlib-code`) built on this machine.

Nothing here touches the network. Both are written once to a cache directory (`$STARCODER_LORA_CACHE`, default
`~/.cache/starcoder-lora`) and are then loaded exactly like a Hub model and a local data file, so the demo and the tests
go through the same `from_pretrained(..., quantization_config=...)` and `load_dataset` paths as a real run.
"""

import ast
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

TINY_MODEL = "tiny-starcoder"
STDLIB_DATASET = "stdlib-code"
_VERSION = "v2"  # bump when the recipe below changes, so stale caches are rebuilt

# StarCoder's special tokens, in its tokenizer's order (bigcode/starcoder tokenizer.json): id 0 is <|endoftext|>.
STARCODER_SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
]
MAX_PAIRS = 3000
MAX_COMPLETION_CHARS = 1500
MAX_PROMPT_CHARS = 1200  # every prompt then leaves room for its completion in 512 tokens


def cache_dir() -> Path:
    return Path(os.environ.get("STARCODER_LORA_CACHE", Path.home() / ".cache" / "starcoder-lora"))


def _build_once(name: str, build) -> Path:
    """Build into a temporary directory and rename it into place, so concurrent processes (torchrun ranks) never see
    a half-written directory; the loser of the race discards its copy."""
    target = cache_dir() / f"{name}-{_VERSION}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    os.chmod(tmp, 0o755)
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _function_pairs(source: str):
    """(docstring, code without the docstring) for every documented function in one module."""
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        if not docstring or len(node.body) < 2:
            continue
        doc_node = node.body[0]
        start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        code = lines[start - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
        indent = len(code[0]) - len(code[0].lstrip())
        completion = "\n".join(line[indent:] for line in code)
        if len(completion) <= MAX_COMPLETION_CHARS and len(docstring) <= MAX_PROMPT_CHARS:
            yield docstring, completion


def _write_stdlib_pairs(directory: Path) -> None:
    pairs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            pairs.extend(_function_pairs(source))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if len(pairs) >= MAX_PAIRS:
            break
    with open(directory / "stdlib-code.jsonl", "w", encoding="utf-8") as f:
        for prompt, completion in pairs[:MAX_PAIRS]:
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def stdlib_dataset_file() -> Path:
    """`stdlib-code`: documented functions of this Python's standard library as prompt/completion pairs (the
    docstring asks, the code answers), the columns of CodeAlpaca. Deterministic for a given Python installation."""
    return _build_once(STDLIB_DATASET, _write_stdlib_pairs) / "stdlib-code.jsonl"


def _write_tiny_starcoder(directory: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTBigCodeForCausalLM, PreTrainedTokenizerFast

    from .architecture import starcoder_config

    # A byte-level BPE like StarCoder's, trained on the embedded corpus so code tokenizes into sensible pieces.
    texts = [json.loads(line) for line in open(stdlib_dataset_file(), encoding="utf-8")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=STARCODER_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((t["prompt"] + "\n" + t["completion"] for t in texts), trainer=trainer)
    # Like StarCoder's: <|endoftext|> is bos, eos and unk, and there is no pad token (the scripts set one).
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", model_max_length=1024,
                                        additional_special_tokens=STARCODER_SPECIAL_TOKENS[1:])
    tokenizer.save_pretrained(directory)

    # StarCoder's architecture at toy width, with this tokenizer's vocabulary and 1,024 positions.
    config = starcoder_config("tiny", vocab_size=len(tokenizer), n_positions=1024)
    torch.manual_seed(0)
    GPTBigCodeForCausalLM(config).save_pretrained(directory)


def tiny_starcoder_path() -> Path:
    """`tiny-starcoder`: an ordinary checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    return _build_once(TINY_MODEL, _write_tiny_starcoder)
