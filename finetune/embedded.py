"""The embedded defaults, built on this machine: tiny models of each supported family (`tiny-starcoder`,
`tiny-starcoder2`, `tiny-llama`, `tiny-qwen2`) and a code data set (`stdlib-code`).

Nothing here touches the network. Each is written once to a cache directory (`$STARCODER_LORA_CACHE`, default
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

STDLIB_DATASET = "stdlib-code"
STDLIB_SOURCE = "stdlib-source"
_VERSION = "v2"  # bump when the recipe below changes, so stale caches are rebuilt

# StarCoder's special tokens, in its tokenizer's order (bigcode/starcoder tokenizer.json): id 0 is <|endoftext|>.
STARCODER_SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<filename>", "<gh_stars>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>", "<commit_after>", "<reponame>",
]
# bigcode/starcoder2-15b special_tokens_map.json, in order (id 0 is <|endoftext|>).
STARCODER2_SPECIAL_TOKENS = [
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>", "<repo_name>", "<file_sep>",
    "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
    "<jupyter_output>", "<jupyter_script>", "<empty_output>", "<code_to_intermediate>", "<intermediate_to_code>",
    "<pr>", "<pr_status>", "<pr_is_merged>", "<pr_base>", "<pr_file>", "<pr_base_code>", "<pr_diff>",
    "<pr_diff_hunk>", "<pr_comment>", "<pr_event_id>", "<pr_review>", "<pr_review_state>", "<pr_review_comment>",
    "<pr_in_reply_to_review_id>", "<pr_in_reply_to_comment_id>", "<pr_diff_hunk_comment_line>", "<NAME>", "<EMAIL>",
    "<KEY>", "<PASSWORD>",
]
# Qwen/Qwen2.5-Coder-7B-Instruct tokenizer_config.json's added tokens that code training uses, in order.
QWEN2_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>",
                        "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
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


def _stdlib_pairs() -> tuple[list[Path], list[tuple[str, str]]]:
    """The standard library's top-level modules, in order, until they give MAX_PAIRS documented functions: the
    modules read and the (docstring, code) pairs."""
    read, pairs = [], []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            pairs.extend(_function_pairs(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        read.append(path)
        if len(pairs) >= MAX_PAIRS:
            break
    return read, pairs[:MAX_PAIRS]


def _write_stdlib_pairs(directory: Path) -> None:
    with open(directory / "stdlib-code.jsonl", "w", encoding="utf-8") as f:
        for prompt, completion in _stdlib_pairs()[1]:
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def _write_stdlib_tree(directory: Path) -> None:
    tree = directory / "stdlib"
    tree.mkdir()
    for path in _stdlib_pairs()[0]:
        shutil.copyfile(path, tree / path.name)


def stdlib_source_tree() -> Path:
    """`stdlib-source`: the modules `stdlib-code` is made from as a source tree, a directory named `stdlib`: the
    repository twin of the embedded data, for training on code files (and fill-in-the-middle) offline."""
    return _build_once(STDLIB_SOURCE, _write_stdlib_tree) / "stdlib"


def stdlib_dataset_file() -> Path:
    """`stdlib-code`: documented functions of this Python's standard library as prompt/completion pairs (the
    docstring asks, the code answers), the columns of CodeAlpaca. Deterministic for a given Python installation."""
    return _build_once(STDLIB_DATASET, _write_stdlib_pairs) / "stdlib-code.jsonl"


# Each tiny model: its architecture (finetune/architecture.py) with 1,024 positions (StarCoder2's window in its
# ratio, 16,384 : 4,096), and its tokenizer as the real family's: the special tokens in their order, which of them
# are bos, eos, unk and pad, and a chat template where the family has one.
_CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
           "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
           "{% endif %}")
TINY_MODELS = {
    # bigcode/starcoder: <|endoftext|> is bos, eos and unk, and there is no pad token (the scripts set one).
    "tiny-starcoder": dict(model_type="gpt_bigcode", special_tokens=STARCODER_SPECIAL_TOKENS,
                           roles=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      unk_token="<|endoftext|>")),
    "tiny-starcoder2": dict(model_type="starcoder2", special_tokens=STARCODER2_SPECIAL_TOKENS, sliding_window=256,
                            roles=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>")),
    # Llama's: <unk>, <s>, </s> first; every text starts with <s>; no FIM tokens (DeepSeek-Coder's and Code Llama's
    # differ), so it is the tokenizer that FIM training refuses.
    "tiny-llama": dict(model_type="llama", special_tokens=["<unk>", "<s>", "</s>"], bos_first=True,
                       roles=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")),
    # Qwen2.5-Coder-Instruct's: ChatML turns ending in <|im_end|> (its eos), <|endoftext|> as pad, FIM tokens in bars.
    "tiny-qwen2": dict(model_type="qwen2", special_tokens=QWEN2_SPECIAL_TOKENS, chat_template=_CHATML,
                       roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")),
}
TINY_MODEL = "tiny-starcoder"


def _write_tiny_model(name: str, directory: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    from .architecture import config

    recipe = TINY_MODELS[name]
    # A byte-level BPE like StarCoder's, trained on the embedded corpus so code tokenizes into sensible pieces.
    texts = [json.loads(line) for line in open(stdlib_dataset_file(), encoding="utf-8")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=recipe["special_tokens"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((t["prompt"] + "\n" + t["completion"] for t in texts), trainer=trainer)
    if recipe.get("bos_first"):
        bos = recipe["roles"]["bos_token"]
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    roles = recipe["roles"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=1024, **roles,
                                        additional_special_tokens=[t for t in recipe["special_tokens"]
                                                                   if t not in roles.values()])
    tokenizer.chat_template = recipe.get("chat_template")
    tokenizer.save_pretrained(directory)

    # The family's architecture at toy width, with this tokenizer's vocabulary and its special tokens' ids.
    ids = {key.replace("_token", "_token_id"): tokenizer.convert_tokens_to_ids(token) for key, token in roles.items()
           if key != "unk_token"}
    window = {"sliding_window": recipe["sliding_window"]} if "sliding_window" in recipe else {}
    model_config = config(recipe["model_type"], "tiny", vocab_size=len(tokenizer), **window, **ids)
    model_config.max_position_embeddings = 1024  # GPTBigCode's n_positions by its attribute map
    with torch.random.fork_rng(devices=[]):  # the same weights every build, and the caller's random state untouched
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model_config)
    stops = [tokenizer.eos_token_id, tokenizer.pad_token_id] if "pad_token" in roles else tokenizer.eos_token_id
    model.generation_config = GenerationConfig(bos_token_id=ids.get("bos_token_id"), eos_token_id=stops)
    model.save_pretrained(directory)


def tiny_model_path(name: str) -> Path:
    """One of TINY_MODELS: an ordinary checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    return _build_once(name, lambda directory: _write_tiny_model(name, directory))
