"""Off the happy path: bad input of every class ends with exit 2, one `error:` line and nothing written; reruns,
retries, torn checkpoints and concurrent runs never damage a result."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import base_example
import generate
import karpathy_speedups_example
from conftest import ROOT, tiny_args, with_flags
from finetune import checkpointing, cli, embedded, secrets
from finetune.cli import TrainArguments
from finetune.sweep import SweepArguments


# A few-second run of the embedded model, the loss on whole examples (32 tokens leave many docstrings no completion).
TINY = ["--model", "tiny-starcoder", "--dataset", "stdlib-code", "--report_to", "none", "--max_eval_samples", "4",
        "--seq_length", "32", "--completion_only_loss", "false"]


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> Path:
    """Damaged and unsuitable inputs, made once: model directories and data files."""
    root = tmp_path_factory.mktemp("broken")
    tiny = embedded.tiny_model_path("tiny-starcoder")
    for name, damage in (("truncated", lambda data: data[:1000]), ("bad-header", lambda data: b"\xff" * 64),
                         ("cut-short", lambda data: data[:-10])):
        shutil.copytree(tiny, root / name)
        weights = root / name / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(root / "bert")
    shutil.copytree(tiny, root / "no-weights")
    (root / "no-weights" / "model.safetensors").unlink()
    shutil.copytree(tiny, root / "other-shape")  # a config edited after the weights were written
    config = json.loads((root / "other-shape" / "config.json").read_text())
    (root / "other-shape" / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    import pandas

    pandas.DataFrame({"prompt": [1, 2], "completion": [3, 4]}).to_parquet(root / "integers.parquet")
    (root / "binary.jsonl").write_bytes(b"\x00\xff\xfe\x81")
    return root


TRAINING = [  # (argv after the common ones, given the fixture's directory; a fragment of the one error line)
    (lambda d: ["--dataset", str(d / "nothing*")], "is not a directory (nor a glob of directories)"),
    (lambda d: ["--dataset", _write(d / "ignored" / ".gitignore", "[z-a]\n*.py\n")
                and _write(d / "ignored" / "a.py", "") and str(d / "ignored")], "holds no source file to train on (skipped: 1 ignored by .gitignore)"),
    (lambda d: ["--dataset", _write(d / "null.jsonl", '{"prompt": "a", "completion": null}\n')], "completion is null"),
    (lambda d: ["--dataset", _write(d / "lists.json", json.dumps({"prompt": ["a"], "completion": ["b"]}))],
     "prompt is of type list"),
    (lambda d: ["--dataset", str(d / "integers.parquet")], "prompt is of type int"),
    (lambda d: ["--dataset", _write(d / "list.jsonl", '{"prompt": ["a", "b"], "completion": "c"}\n')],
     "prompt is of type list"),
    (lambda d: ["--dataset", str(d / "binary.jsonl")], "could not read dataset file"),
    (lambda d: ["--dataset", _write(d / "bad.csv", 'prompt,completion\n"a,b\n')], "could not read dataset file"),
    (lambda d: ["--dataset", _write(d / "one.jsonl", '{"prompt": "a", "completion": "b"}\n'), "--packing"],
     "made no full block"),
    (lambda d: ["--learning_rate", "-1"], "--learning_rate must be a positive number"),
    (lambda d: ["--learning_rate", "nan"], "--learning_rate must be a positive number"),
    (lambda d: ["--lora_r", "0"], "--lora_r must be a positive integer"),
    (lambda d: ["--lora_alpha", "0"], "--lora_alpha must be a positive integer"),
    (lambda d: ["--lora_dropout", "1.5"], "--lora_dropout must be at least 0 and below 1"),
    (lambda d: ["--logging_steps", "0"], "--logging_steps must be a positive integer"),
    (lambda d: ["--eval_steps", "0"], "--eval_steps must be a positive integer"),
    (lambda d: ["--max_eval_samples", "0"], "--max_eval_samples must be a positive integer"),
    (lambda d: ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive integer"),
    (lambda d: ["--seed", "-1"], "--seed must be between 0 and 2**32 - 1"),
    (lambda d: ["--seq_length", "1"], "--seq_length must be at least 2"),
    (lambda d: ["--grace_period_seconds", "-1"], "--grace_period_seconds must be a positive number"),
    (lambda d: ["--weight_decay", "nan"], "--weight_decay must be a number, 0 or more"),
    (lambda d: ["--warmup_steps", "2", "--warmup_ratio", "0.1"], "not both"),
    (lambda d: ["--lora_target_modules", "nonsense,c_attn"], "LoRA targets ['nonsense'] match no layer"),
    (lambda d: ["--model", str(d / "truncated")], "could not load model"),
    (lambda d: ["--model", str(d / "bad-header")], "could not load model"),
    (lambda d: ["--model", str(d / "cut-short")], "could not load model"),
    (lambda d: ["--model", str(d / "bert")], "is a BertForMaskedLM, not a causal language model"),
    (lambda d: ["--model", str(d / "no-such-model")], "the path does not exist"),
    (lambda d: ["--model", _write(d / "weights.safetensors", "x")], "is a file; give the model's directory"),
    (lambda d: ["--output_dir", ""], "--output_dir must not be empty"),
    (lambda d: ["--wandb_project", "team/project"], "--wandb_project 'team/project': W&B takes at most 128"),
    (lambda d: ["--wandb_project", "p" * 129], "W&B takes at most 128 characters, none of / \\ # ? % :"),
    (lambda d: ["--output_dir", "/proc/no-such/out"], "cannot be written"),
    (lambda d: ["--hf_tok", "PLANTEDtokenWithoutPrefix"], "unknown arguments"),
    (lambda d: ["--batch_size", "abc"], "invalid int value"),
    (lambda d: ["--quantization", "fp4"], "invalid choice"),
    (lambda d: ["--prompt_column", ""], "--prompt_column must not be empty"),
    (lambda d: ["--humaneval_limit", "-1"], "--humaneval_limit must be 0"),
    # numbers bounded by what they mean, before .lock or .staging exist
    (lambda d: ["--batch_size", "99999999999999999999"], "--batch_size must be at most 1,000,000,000"),
    (lambda d: ["--lora_r", "99999999999"], "--lora_r must be at most 1,000,000,000"),
    (lambda d: ["--lora_r", "200"], "--lora_r 200 is above the rank of the smallest layer it adapts (128)"),
    (lambda d: ["--batch_size", "5000", "--seq_length", "32"], "a step takes 5000 training examples"),
    (lambda d: ["--grace_period_seconds", "1e20"], "--grace_period_seconds must be at most 86400"),
    (lambda d: ["--humaneval_limit", "200"], "--humaneval_limit must be 0 (all 164 problems) to 164"),
    (lambda d: ["--warmup_steps", "100", "--max_train_steps", "10"], "--warmup_steps must be 0 to --max_train_steps"),
    (lambda d: ["--num_train_epochs", "0"], "--num_train_epochs must be a positive number"),
    (lambda d: ["--num_train_epochs", "inf"], "--num_train_epochs must be a positive number"),
    (lambda d: ["--max_file_bytes", "0"], "--max_file_bytes must be a positive integer"),
    (lambda d: ["--fim_rate", "1.5"], "--fim_rate must be a share, 0 to 1"),
    (lambda d: ["--gradient_checkpointing", "--checkpointed_layers", "half"],
     "--checkpointed_layers must be all, fit or a number of layers, got 'half'"),
    (lambda d: ["--checkpointed_layers", "2"], "--checkpointed_layers 2 acts on the layers --gradient_checkpointing "
                                               "checkpoints, and it is off: set --gradient_checkpointing, or leave "
                                               "out --checkpointed_layers 2"),
    (lambda d: ["--gradient_checkpointing", "--checkpointed_layers", "9"],
     "--checkpointed_layers 9 is more than the model's 4 decoder layers"),
    (lambda d: ["--offloaded_layers", "2"], "--offloaded_layers 2 acts on the layers --gradient_checkpointing "
                                            "checkpoints"),
    (lambda d: ["--gradient_checkpointing", "--offloaded_layers", "-1"],
     "--offloaded_layers must be a number of layers, 0 or more, got -1"),
    (lambda d: ["--gradient_checkpointing", "--offloaded_layers", "2", "--compile_layers"],
     "--offloaded_layers 2 is not built for compiled layers: leave out --compile_layers, or leave out "
     "--offloaded_layers 2"),
    (lambda d: ["--packed_attention", "joined"], "--packed_attention joined acts on the blocks --packing makes, and "
                                                 "it is off: set --packing, or leave out --packed_attention joined"),
    (lambda d: ["--humaneval_limit", "5"], "--humaneval_limit 5 acts on the problems --humaneval and "
                                           "--humaneval_infilling run, and both are off: set --humaneval, or leave"),
    (lambda d: ["--offload_layer_inputs"], "--offload_layer_inputs acts on the layers --gradient_checkpointing "
                                           "checkpoints"),
    (lambda d: ["--recipe", "lean", "--gradient_checkpointing", "false"],
     "--checkpointed_layers fit and --offload_layer_inputs (--recipe lean sets them) act on the layers "
     "--gradient_checkpointing checkpoints, and it is off: leave out --gradient_checkpointing false, or set "
     "--checkpointed_layers all --offload_layer_inputs false"),
    (lambda d: ["--gradient_checkpointing", "--offload_layer_inputs", "--compile_layers"],
     "--offload_layer_inputs is not built for compiled layers"),
    (lambda d: ["--recipe", "lean", "--compile_layers"], "--offload_layer_inputs (--recipe lean sets it) is not built "
                                                         "for compiled layers: leave out --compile_layers, or set "
                                                         "--offload_layer_inputs false"),
    (lambda d: ["--push_to_hub", "--hub_model_id", "not an id!"], "is not a Hub repository id"),
    (lambda d: ["--model", str(d / "no-weights")], "holds a config.json but no weights"),
    (lambda d: ["--model", str(d / "other-shape")], "the config and the weights are of different models"),
    # a value given twice, under one spelling or two
    (lambda d: ["--lora_r", "4", "--lora-r", "8"], "--lora-r is given twice (--lora_r came first)"),
    (lambda d: ["--packing", "--packing", "false"], "--packing is given twice"),
    # data judgement calls
    (lambda d: ["--dataset", _write(d / "empty-answers.jsonl", '{"prompt": "a", "completion": ""}\n' * 3)],
     "every completion is empty"),
    (lambda d: ["--prompt_column", "text", "--completion_column", "text"], "are both 'text'; name two columns"),
    (lambda d: ["--dataset", _write(d / "twice.csv", "prompt,prompt,completion\na,b,c\n")], "names prompt twice"),
    (lambda d: ["--dataset", _write(d / "local.jsonl", '{"prompt": "a", "completion": "b"}\n'), "--eval_split",
                "test"], "has one split, train"),
    (lambda d: ["--extensions", "python"], "--extensions chooses the files of a source tree"),
    (lambda d: ["--eval_dataset", str(d / "integers.parquet")], "prompt is of type int"),
    (lambda d: ["--dataset", _write(d / "chat-list.jsonl", '{"messages": "hello"}\n')],
     "row 0: messages is not a non-empty list"),
    (lambda d: ["--dataset", _write(d / "chat-role.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}\n')],
     "turn 0 has role 'bot'"),
    (lambda d: ["--dataset", _write(d / "chat-none.jsonl", '{"messages": [{"role": "user", "content": "x"}]}\n')],
     "has no assistant turn after a user turn"),
]
SWEEP = [
    (["--sweep_batch_sizes", "1,abc"], "'abc' is not a positive integer"),
    (["--sweep_batch_sizes", "0"], "'0' is not a positive integer"),
    (["--sweep_packing", "maybe"], "'maybe' is not true or false"),
    (["--num_workers", "-1"], "--num_workers must be 0 or more"),
    (["--num_workers", "100000"], "--num_workers asks for 100000 data loader workers, and this process may use"),
    (["--sweep_num_workers", "0,1000"], "--sweep_num_workers asks for 1000 data loader workers"),
    (["--sweep_num_workers", "0,100000"], "'100000' is not a whole number up to 1024"),
    (["--memory_budget_gib", "nan"], "--memory_budget_gib must be a number"),
]


def _write_bytes(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


def refused(capsys, main, types, argv) -> str:
    """Run a script's main on argv; assert exit 2 and exactly one line on stderr, `error: ...`; return it."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, *types, argv=argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("make_argv,message", TRAINING)
def test_bad_training_input_exits_2_with_one_line_and_writes_nothing(broken, tmp_path, capsys, make_argv, message):
    out = tmp_path / "out"
    argv = ["--model", "tiny-starcoder", "--dataset", "stdlib-code", "--report_to", "none", "--output_dir", str(out)]
    extra = make_argv(broken)
    before = _snapshot(broken), _snapshot(tmp_path)
    line = refused(capsys, base_example.main, (TrainArguments,), with_flags(argv, extra))
    assert message in line, line
    assert (_snapshot(broken), _snapshot(tmp_path)) == before, "bad input must not write anything"


def _take(argv: list[str], way: str) -> list[str]:
    """argv after one way out a refusal names: `leave out --a 1 and --b`, `set --c 2 --d` (in place of a --c given,
    else added), `replace --e 3 with --e 4`, or several of these joined by `and`."""
    argv = list(argv)
    for verb, what in re.findall(r"(leave out|set|replace) (.+?)(?= and (?:leave out|set|replace) |$)", way):
        if verb == "set":
            for flag in re.findall(r"--\S+(?: [^-]\S*)?", what):
                given = [i for i, token in enumerate(argv) if token == flag.split()[0]]
                if given:  # the flag and its value, if it has one
                    end = given[0] + 1 + (given[0] + 1 < len(argv) and not argv[given[0] + 1].startswith("--"))
                    argv[given[0]:end] = []
                argv += flag.split()
            continue
        old, new = what.split(" with ") if verb == "replace" else (what, "")
        for flags in old.split(" and "):
            at = next(i for i in range(len(argv)) if argv[i:i + len(flags.split())] == flags.split())
            argv[at:at + len(flags.split())] = new.split()
    return argv


# Settings that do not work together. The refusal names each way out, and each gets past it: a setting the recipe
# made is set switched off (leaving out what the user never typed would do nothing; adding what they typed with the
# recipe's own value would give it twice), a typed one left out.
@pytest.mark.parametrize("flags", [
    ["--recipe", "lean", "--compile_layers"], ["--recipe", "lean", "--gradient_checkpointing", "false"],
    ["--recipe", "lean", "--offload_layer_inputs", "--gradient_checkpointing", "false"],
    ["--checkpointed_layers", "2"], ["--gradient_checkpointing", "--offloaded_layers", "2", "--compile_layers"],
    ["--packed_attention", "joined"], ["--recipe", "fast", "--packing", "false", "--packed_attention", "joined"],
    ["--humaneval_limit", "5"],
    ["--recipe", "fp8", "--dtype", "float16"], ["--recipe", "tutorial", "--quantization", "fp8"],
    ["--recipe", "tutorial", "--quantization", "fp8", "--dtype", "float32"], ["--recipe", "fp8", "--fp8_matmuls"],
    ["--recipe", "lean_fp8", "--quantization", "8bit"], ["--recipe", "qlora", "--fp8_matmuls"],
    ["--fp8_matmuls", "--fuse_lora", "false"],
    ["--recipe", "lean_fp8", "--fp8_matmuls", "true", "--lora_dropout", "0.1"],
])
def test_each_way_out_a_refusal_names_gets_past_it(flags):
    with pytest.raises(cli.UsageError) as refusal:
        cli.parse(TrainArguments, argv=flags)
    ways = re.sub(r" \([^)]*\)$", "", str(refusal.value).rsplit(": ", 1)[1]).split(", or ")
    for way in ways:
        assert re.match("(leave out|set|replace) --", way), str(refusal.value)
        cli.parse(TrainArguments, argv=_take(flags, way))


@pytest.mark.parametrize("extra,message", SWEEP)
def test_bad_sweep_input_exits_2_with_one_line(tmp_path, capsys, extra, message):
    argv = ["--model", "tiny-starcoder", "--dataset", "stdlib-code", "--report_to", "none",
            "--output_dir", str(tmp_path / "sweep"), *extra]
    line = refused(capsys, karpathy_speedups_example.main,
                   (TrainArguments, karpathy_speedups_example.SpeedupArguments, SweepArguments), argv)
    assert message in line, line
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "out"
    base_example.main(tiny_args(out, max_train_steps=2, eval_steps=2, seq_length=32))
    return out


def _partial_adapter(adapter: Path, scratch: Path) -> str:
    """A copy of `adapter` whose weights file lacks the first layer's c_attn: a file cut and saved again."""
    from safetensors.torch import load_file, save_file

    copy = scratch / "partial"
    shutil.copytree(adapter, copy, ignore=shutil.ignore_patterns("checkpoint-*", "wandb"))
    weights = load_file(copy / "adapter_model.safetensors")
    save_file({name: w for name, w in weights.items() if ".0.attn.c_attn." not in name},
              copy / "adapter_model.safetensors")
    return str(copy)


GENERATE = [  # (argv given the adapter and a scratch directory, fragment)
    (lambda a, d: ["--adapter", str(Path(_write(d / "adapter_config.json", "{not json")).parent), "--prompt", "x"],
     "(the adapter's configuration) cannot be read"),
    (lambda a, d: ["--adapter", str(Path(_write(d / "adapter_config.json", '{"peft_type": "LORA"}')).parent),
                   "--prompt", "x"], "names no base model"),
    (lambda a, d: ["--adapter", str(d / "none"), "--prompt", "x"], "holds no adapter"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "word " * 2000], "the model has 1024"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "x", "--model", "tiny-starcoder2"],  # its MLP has a c_proj too
     "and does not fit 'tiny-starcoder2': 24 of its weights have no layer there (base_model.model.transformer.h.0.attn"),
    (lambda a, d: ["--adapter", _partial_adapter(a, d), "--prompt", "x"], "2 of the layers it adapts there have no "
                                                                          "weights in it"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "x", "--max_new_tokens", "0"], "--max_new_tokens must be"),
    (lambda a, d: ["--adapter", str(a), "--prompts_file", str(d / "none.txt")], "cannot be read as UTF-8 text"),
    (lambda a, d: ["--adapter", str(a), "--prompts_file", _write_bytes(d / "b.txt", b"\xff\x81")],
     "cannot be read as UTF-8 text"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "x", "--do_sample", "--temperature", "0"], "--temperature must be"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "x", "--do_sample", "--top_p", "0"], "--top_p must be"),
    (lambda a, d: ["--adapter", str(a), "--evaluate", "--dataset",
                   _write(d / "null.jsonl", '{"prompt": "a", "completion": null}\n')], "completion is null"),
    (lambda a, d: ["--adapter", str(a), "--merge", "--merged_dir", _write(d / "a-file", "keep")], "is a file"),
    (lambda a, d: ["--adapter", str(a), "--merge", "--merged_dir",
                   str(Path(_write(d / "config.json", "{}")).parent)], "holds files that --merge did not write"),
    (lambda a, d: ["--adapter", str(a)], "nothing to do"),
    (lambda a, d: ["--adapter", str(a), "--prompts_file", _write(d / "blank.txt", "\n  \n")], "holds no prompt"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "x", "--num_samples", "2"], "give --humaneval too"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "x", " "], "--prompt holds an empty prompt"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "x", "--humaneval_limit", "5"], "--humaneval_limit acts with "
                                                                                   "--humaneval or --humaneval_infilling"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "x", "--dataset", "stdlib-code", "--seed", "3"],
     "--dataset and --seed act with --evaluate, which is not given: give --evaluate too, or leave out --dataset and"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "x", "--merged_dir", str(d / "m")], "--merged_dir acts with "
                                                                                        "--merge"),
    (lambda a, d: ["--adapter", str(a), "--merge", "--merged_dir", str(d / "merged"), "--prompt", "x", "--evaluate"],
     "--merge saves the merged model and does nothing else; give --prompt, --evaluate in another command"),
    (lambda a, d: ["--adapter", str(a), "--humaneval_limit", "-1"], "--humaneval_limit must be"),
]


@pytest.mark.parametrize("make_argv,message", GENERATE)
def test_bad_generate_input_exits_2_with_one_line_and_writes_nothing(adapter, tmp_path, capsys, make_argv,
                                                                      message):
    argv = make_argv(adapter, tmp_path)
    before = _snapshot(adapter), _snapshot(tmp_path)
    line = refused(capsys, generate.main, (generate.GenerateArguments,), argv)
    assert message in line, line
    assert (_snapshot(adapter), _snapshot(tmp_path)) == before


def test_a_rerun_of_a_finished_run_changes_nothing_and_a_raised_step_count_continues(tmp_path, capsys):
    argv = [*TINY, "--eval_steps", "3", "--logging_steps", "1", "--max_train_steps", "6",
            "--output_dir", str(tmp_path / "out")]
    cli.run(base_example.main, TrainArguments, argv=argv)
    finished = _snapshot(tmp_path / "out")
    capsys.readouterr()
    for _ in range(2):  # a Job retrying a pod after training finished
        assert cli.run(base_example.main, TrainArguments, argv=argv) is None
        assert "already finished: 6 steps" in capsys.readouterr().out
        assert _snapshot(tmp_path / "out") == finished
    cli.run(base_example.main, TrainArguments, argv=with_flags(argv, ["--max_train_steps", "9"]))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == 9
    assert [c.name for c in checkpointing.complete_checkpoints(str(tmp_path / "out"))][-1] == "checkpoint-9"


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_torn_checkpoint_is_skipped_with_one_warning(tmp_path, capsys, damaged):
    out = tmp_path / "out"
    argv = [*TINY, "--eval_steps", "2", "--max_train_steps", "4", "--output_dir", str(out)]
    cli.run(base_example.main, TrainArguments, argv=with_flags(argv, ["--max_train_steps", "4"]))
    (out / "manifest.json").unlink()  # as if the run had been stopped after its last checkpoint
    newest = out / "checkpoint-4"
    (newest / damaged).write_bytes((newest / damaged).read_bytes()[:100])
    capsys.readouterr()
    cli.run(base_example.main, TrainArguments, argv=with_flags(argv, ["--max_train_steps", "6"]))
    output = capsys.readouterr().out
    warnings = [line for line in output.splitlines() if line.startswith("warning: skipping checkpoint-4")]
    assert len(warnings) == 1 and damaged in warnings[0], output
    assert "resuming from " + str(out / "checkpoint-2") in output
    assert checkpointing.damage(out / "checkpoint-6") is None


def test_a_second_run_on_the_same_directory_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    common = [sys.executable, "base_example.py", *TINY, "--logging_steps", "1", "--output_dir", str(out)]
    long = ["--max_train_steps", "400", "--eval_steps", "400"]
    first = subprocess.Popen([*common, *long, "--learning_rate", "1e-4"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        for line in first.stdout:
            if line.startswith("step 1/"):
                break
        second = subprocess.run([*common, *long, "--learning_rate", "3e-4"], cwd=ROOT, capture_output=True,
                                text=True)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip().splitlines() == [
            f"error: --output_dir {str(out)!r} is in use by another run (pid {first.pid} on {os.uname().nodename}); "
            f"wait for it to end, or use another --output_dir"]
    finally:
        first.kill()
        first.wait()
    # the kernel released the killed holder's lock: the directory is free again (and holds no configuration yet)
    rerun = subprocess.run([*common, "--learning_rate", "3e-4", "--max_train_steps", "2", "--eval_steps", "2"],
                           cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]


def test_a_run_that_fails_before_its_first_checkpoint_leaves_the_directory_free(tmp_path, monkeypatch):
    from finetune import training

    def fail(*args, **kwargs):
        raise RuntimeError("killed before the first checkpoint")

    args = tiny_args(tmp_path / "out", learning_rate=1e-3, max_train_steps=2, eval_steps=2)
    with monkeypatch.context() as patch:
        patch.setattr(training.Trainer, "train", fail)
        with pytest.raises(RuntimeError):
            base_example.main(args)
    assert not (tmp_path / "out" / checkpointing.RUN_CONFIG).exists()
    base_example.main(tiny_args(tmp_path / "out", learning_rate=2e-3, max_train_steps=2, eval_steps=2))
    assert json.loads((tmp_path / "out" / checkpointing.RUN_CONFIG).read_text())["learning_rate"] == 2e-3


def test_a_learning_rate_that_diverges_is_one_line_and_no_adapter(tmp_path, capsys):
    out = tmp_path / "out"
    line = refused(capsys, base_example.main, (TrainArguments,),
                   ["--model", "tiny-starcoder", "--dataset", "stdlib-code", "--report_to", "none", "--output_dir",
                    str(out), "--max_train_steps", "2", "--learning_rate", "1e10"])
    assert "the adapter's weights became NaN or infinite by step 2" in line and "Lower --learning_rate" in line, line
    assert not {"adapter_model.safetensors", "manifest.json", "checkpoint-2"} & {p.name for p in out.iterdir()}


def test_weights_that_turn_nan_are_never_saved_and_a_rerun_resumes_from_the_last_good_checkpoint(tmp_path,
                                                                                                  monkeypatch):
    import torch
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    from finetune import training

    class Poison(TrainerCallback):  # what a too-high learning rate does, at step 3 of a run that saves every 2 steps
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 3:
                with torch.no_grad():
                    next(p for name, p in model.named_parameters() if "lora_B" in name).fill_(float("nan"))

    build = training.build_trainer
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(training, "build_trainer", lambda *a, callbacks=(), **k: build(*a, callbacks=[Poison()], **k))
        with pytest.raises(cli.UsageError, match="NaN or infinite by step 4 .*checkpoint kept: .*checkpoint-2"):
            base_example.main(tiny_args(out, eval_steps=2, logging_steps=5))
    assert [p.name for p in checkpointing.complete_checkpoints(str(out))] == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "manifest.json").exists()
    base_example.main(tiny_args(out, eval_steps=2, logging_steps=5))  # the same command, resumed at step 2
    assert json.loads((out / "manifest.json").read_text())["metrics"]["global_step"] == 6
    assert all(weight.isfinite().all() for weight in load_file(out / "adapter_model.safetensors").values())


def test_overwrite_removes_the_previous_run_before_the_new_one_writes(tmp_path, monkeypatch):
    from finetune import training

    out = tmp_path / "out"
    base_example.main(tiny_args(out, max_train_steps=2, eval_steps=2))
    assert (out / "adapter_model.safetensors").is_file() and (out / "manifest.json").is_file()
    (out / "notes.txt").write_text("the user's own file")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        base_example.main(tiny_args(out, max_train_steps=2, eval_steps=2, learning_rate=1e-3,
                                    overwrite_output_dir=True))
    left = {p.name for p in out.iterdir()}
    assert not {"adapter_model.safetensors", "adapter_config.json", "manifest.json", "run_config.json",
                "checkpoint-2"} & left, left
    assert "notes.txt" in left


def test_a_secret_is_scrubbed_from_the_command_line_by_its_parsed_value(monkeypatch):
    secret = "PLANTEDtokenWithoutPrefix"  # no hf_ prefix: only its flag or its parsed value gives it away
    for spelling in (["--hf-token", secret], [f"--hf_token={secret}"]):
        monkeypatch.setattr(sys, "argv", ["base_example.py", *spelling, "--wandb_project", f"copy-of-{secret}"])
        (args,) = cli.parse(TrainArguments, argv=sys.argv[1:])
        assert args.hf_token == secret
        secrets.scrub_argv([args])
        assert secret not in " ".join(sys.argv), sys.argv


def test_sigterm_to_a_sweep_reaches_its_running_child(tmp_path):
    out = tmp_path / "sweep"
    parent = subprocess.Popen(
        [sys.executable, "karpathy_speedups_example.py", *TINY, "--logging_steps", "1", "--num_workers", "0",
         "--max_train_steps", "300", "--sweep_batch_sizes", "2,4", "--output_dir", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in parent.stdout:
        if "step 3/300" in line:  # the first configuration is training
            break
    parent.send_signal(signal.SIGTERM)
    _, errors = parent.communicate(timeout=120)
    assert parent.returncode == 128 + signal.SIGTERM, errors[-2000:]
    assert "sweep stopped during bs2-w0-pin1-pack0-ckpt0" in errors
    row = json.loads((out / "bs2-w0-pin1-pack0-ckpt0" / "result.json").read_text())
    assert row["status"] == "stopped"
    assert checkpointing.complete_checkpoints(str(out / "bs2-w0-pin1-pack0-ckpt0")), "the child wrote a checkpoint"
    assert not (out / "bs4-w0-pin1-pack0-ckpt0").exists(), "the sweep went no further"


# -- the environment is input too ---------------------------------------------------------------------------------
ENVIRONMENT = [  # (variables, a fragment of the one error line); W&B on, as by default
    ({"WANDB_MODE": "bogus"}, "$WANDB_MODE must be one of online, offline, disabled"),
    ({"WANDB_MODE": "online"}, "WANDB_MODE=online needs a W&B API key"),
    ({"WANDB_BASE_URL": "ftp://example.org"}, "$WANDB_BASE_URL must be an http:// or https:// address"),
    ({"WANDB_PROJECT": " "}, "$WANDB_PROJECT is set but empty"),
    ({"WANDB_PROJECT": "team/project"}, "W&B refuses a WANDB_* variable: Invalid project name 'team/project'"),
    ({"WANDB_TAGS": "t" * 65}, "W&B refuses a WANDB_* variable (its run_tags setting): Value error, Tag"),
    ({"PEAK_TFLOPS": "abc"}, "$PEAK_TFLOPS must be this GPU's dense bf16 peak"),
    ({"PEAK_TFLOPS": "-5"}, "$PEAK_TFLOPS must be this GPU's dense bf16 peak"),
    ({"STARCODER_LORA_CACHE": "/proc/no-such/cache"}, "$STARCODER_LORA_CACHE (/proc/no-such/cache) cannot be written"),
    ({"HF_HOME": "/proc/no-such/hf"}, "$HF_HOME (/proc/no-such/hf) cannot be written"),
    ({"HF_TOKEN": "hf_abcdefghijkl\n"}, "$HF_TOKEN holds spaces or line breaks"),
    ({"HF_HUB_OFFLINE": "maybe"}, "$HF_HUB_OFFLINE must be 1 or 0"),
    ({"HF_DATASETS_CACHE": "/proc/no-such/d"}, "$HF_DATASETS_CACHE (/proc/no-such/d) cannot be written"),
    ({"HF_HUB_CACHE": "/proc/no-such/h"}, "$HF_HUB_CACHE (/proc/no-such/h) cannot be written"),
    ({"LOCAL_RANK": "0"}, "a distributed run ($LOCAL_RANK is set) needs $RANK, $WORLD_SIZE, $MASTER_ADDR, $MASTER_PORT "
                          "too; launch with torchrun or accelerate launch"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "($WORLD_SIZE is set) needs $LOCAL_RANK, $MASTER_ADDR, $MASTER_PORT too"),
    ({"RANK": "1"}, "$RANK (1) must be below $WORLD_SIZE (1)"),  # it made the run skip the directory's lock
    ({"RANK": "abc"}, "$RANK must be a whole number, 0 or more, got 'abc'"),
    ({"WORLD_SIZE": "0"}, "$WORLD_SIZE must be a whole number, 1 or more, got '0'"),
]


@pytest.mark.parametrize("variables,message", ENVIRONMENT)
def test_a_bad_environment_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, variables, message):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    before = _snapshot(tmp_path)
    line = refused(capsys, base_example.main, (TrainArguments,), [*TINY[:4], "--output_dir", str(tmp_path / "out")])
    assert message in line, line
    assert _snapshot(tmp_path) == before


@pytest.fixture
def silent_server():
    """A local port that accepts connections and never answers: a W&B server that hangs."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    thread = threading.Thread(target=lambda: [held.append(server.accept()) for _ in range(8)], daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("server,mode", [("closed", None), ("silent", None), ("silent", "online")])
def test_a_wandb_server_that_never_answers_means_offline_with_one_warning(tmp_path, capsys, monkeypatch,
                                                                         silent_server, server, mode):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    # a closed port refuses the connection at once; a silent one accepts it and never answers
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9" if server == "closed" else silent_server)
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    started = time.time()
    base_example.main(tiny_args(tmp_path / "out", report_to="wandb", max_train_steps=1, eval_steps=1))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "does not answer within 5 s" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: the W&B server")
    assert list((tmp_path / "out").glob("wandb/offline-run-*")) and time.time() - started < 90


# -- files a run finds in its output directory --------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    cli.run(base_example.main, TrainArguments, argv=[*TINY, "--max_train_steps", "2", "--eval_steps", "2",
                                                     "--output_dir", str(out)])
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def rerun(capsys, out: Path, *extra: str, argv: list[str] = TINY) -> subprocess.CompletedProcess:
    """The same command again, in this process (its exit status, what it printed); a traceback fails the test."""
    arguments = with_flags([*argv, "--max_train_steps", "2", "--eval_steps", "2", "--output_dir", str(out)],
                           list(extra))
    capsys.readouterr()
    try:
        cli.run(base_example.main, TrainArguments, argv=arguments)
        code = 0
    except SystemExit as stop:
        code = stop.code
    checkpointing.release(str(out))  # as the process's end would
    printed = capsys.readouterr()
    return subprocess.CompletedProcess(arguments, code, printed.out, printed.err)


def _damage_manifest(out: Path, text: str):
    (out / "manifest.json").write_text(text)


RECOVERED = [  # (damage, the warning): the run resumes from its verified checkpoints and writes a new manifest
    (lambda out: _damage_manifest(out, '{"metrics": {"global_st'), "manifest.json is damaged"),
    (lambda out: _damage_manifest(out, '{"metrics": {"global_step": "2"}}'), "its global_step is '2'"),
    (lambda out: _damage_manifest(out, "[]"), "manifest.json is damaged"),
]


@pytest.mark.parametrize("damage,warning", RECOVERED)
def test_a_damaged_manifest_means_an_unfinished_run_that_resumes(finished_run, tmp_path, capsys, damage, warning):
    out = copy_of(finished_run, tmp_path)
    damage(out)
    done = rerun(capsys, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert warning in done.stdout
    assert json.loads((out / "manifest.json").read_text())["metrics"]["global_step"] == 2


REFUSED = [  # (damage, a fragment of the one error line)
    (lambda out: (out / "run_config.json").write_text('{"lora_r": 1'), "run_config.json (the configuration this "
                                                                       "directory trains) cannot be read"),
    (lambda out: (out / "run_config.json").write_text("[1, 2]"), "holds a JSON list, not a JSON object"),
    (lambda out: ((out / "manifest.json").unlink(), (out / ".lock").unlink(), (out / ".lock").mkdir()),
     "cannot be the toolkit's lock file"),
    (lambda out: ((out / "manifest.json").unlink(), (out / ".lock").unlink(),
                  (out / ".lock").symlink_to(out.parent / "elsewhere.txt")),
     "(the toolkit's lock file) is a symbolic link"),
    (lambda out: ((out / "adapter_model.safetensors").write_bytes(b"cut"),
                  (out / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"cut")),
     "is damaged (adapter_model.safetensors does not match its recorded size and hash) and no intact checkpoint"),
    (lambda out: ((out / "run_config.json").unlink(), (out / "run_config.json").symlink_to(out.parent / "x.json")),
     "is a symbolic link"),
]


@pytest.mark.parametrize("damage,message", REFUSED)
def test_damaged_or_foreign_files_of_a_run_are_one_line(finished_run, tmp_path, capsys, damage, message):
    out = copy_of(finished_run, tmp_path)
    (tmp_path / "elsewhere.txt").write_text("not the lock's")
    damage(out)
    done = rerun(capsys, out)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert (tmp_path / "elsewhere.txt").read_text() == "not the lock's"  # no link followed


def test_a_damaged_final_adapter_is_rebuilt_from_its_checkpoint(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    original = (out / "adapter_model.safetensors").read_bytes()
    (out / "adapter_model.safetensors").write_bytes(original[: len(original) // 2])
    done = rerun(capsys, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rebuilt it from checkpoint-2" in done.stdout and "already finished: 2 steps" in done.stdout
    assert (out / "adapter_model.safetensors").read_bytes() == original


def test_what_a_user_leaves_beside_the_checkpoints_is_left_alone(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    (out / "checkpoint-notes").mkdir()
    (out / "checkpoint-notes" / checkpointing.MARKER).write_text("{}")
    (out / "checkpoint-99").write_text("a file, not a checkpoint")
    (out / "checkpoint-98").symlink_to(out / "checkpoint-2")
    (out / "manifest.json").unlink()  # as if stopped after its last checkpoint: the rerun resumes
    done = rerun(capsys, out, "--max_train_steps", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint-2'}" in done.stdout
    assert (out / "checkpoint-99").read_text() == "a file, not a checkpoint" and (out / "checkpoint-98").is_symlink()
    assert (out / "checkpoint-notes" / checkpointing.MARKER).read_text() == "{}"


def test_a_checkpoint_marker_of_the_wrong_shape_is_skipped_with_one_warning(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    (out / "manifest.json").unlink()
    (out / "checkpoint-2" / checkpointing.MARKER).write_text('{"files": ["not", "a", "mapping"]}')
    done = rerun(capsys, out, "--max_train_steps", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: skipping checkpoint-2: its completion marker does not list files" in done.stdout


def test_a_damaged_wandb_id_starts_a_new_wandb_run_and_a_directory_there_is_refused(finished_run, tmp_path,
                                                                                   capsys):
    out = copy_of(finished_run, tmp_path)
    (out / "manifest.json").unlink()
    (out / "wandb_run_id").write_text("not an id!\n")
    wandb_on = [a for a in TINY if a not in ("--report_to", "none")]
    done = rerun(capsys, out, argv=wandb_on)
    assert done.returncode == 0 and "does not hold a W&B run id" in done.stdout
    assert re.fullmatch(r"[a-z0-9]{8}", (out / "wandb_run_id").read_text())
    (out / "manifest.json").unlink()
    (out / "wandb_run_id").unlink()
    (out / "wandb_run_id").mkdir()
    done = rerun(capsys, out, argv=wandb_on)
    assert done.returncode == 2 and "is not a file (the toolkit keeps the run's W&B id there)" in done.stderr


# -- nothing destructive touches what the toolkit did not write ----------------------------------------------------
def test_a_directory_of_the_users_files_is_refused_even_with_overwrite(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("README.md", "notes.txt", "adapter_config.json"):  # a model card and an adapter would replace two
        (out / name).write_text(f"the user's own {name}")
    before = _snapshot(out)
    for extra in ((), ("--overwrite_output_dir",)):
        done = rerun(capsys, out, *extra)
        assert done.returncode == 2 and "holds other files (README.md, adapter_config.json, notes.txt) and " \
            "no run to resume; give a new or empty directory" in done.stderr, done.stderr
        assert _snapshot(out) == before
    for name in ("README.md", "notes.txt", "adapter_config.json"):  # what a run leaves before its first checkpoint
        (out / name).unlink()
    (out / "wandb_run_id").write_text("abcd1234")
    (out / ".lock").write_text("pid 1 on a lost node")
    assert rerun(capsys, out).returncode == 0


def test_overwrite_removes_the_previous_runs_files_and_only_those(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    (out / "notes.txt").write_text("the user's")
    written = set(json.loads((out / "manifest.json").read_text())["outputs"])
    assert {"adapter_model.safetensors", "README.md", "run_config.json"} <= written
    removed = checkpointing.previous_run_files(str(out))
    assert {p.name for p in removed} == written | {"manifest.json", "checkpoint-2"}
    done = rerun(capsys, out, "--overwrite_output_dir", "--learning_rate", "1e-3")
    assert done.returncode == 0 and (out / "notes.txt").read_text() == "the user's"


@pytest.mark.parametrize("inside,message", [("checkpoint-2", "is a checkpoint of a run"),
                                            ("sub", "is inside the run directory")])
def test_an_output_directory_in_another_run_is_refused(finished_run, tmp_path, capsys, inside, message):
    out = copy_of(finished_run, tmp_path)
    before = _snapshot(out)
    done = rerun(capsys, out / inside)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert _snapshot(out) == before


def test_a_merge_never_replaces_its_source_nor_what_it_did_not_write(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    before = _snapshot(out)
    for target in (out, out.parent, out / "merged"):
        line = refused(capsys, generate.main, (generate.GenerateArguments,),
                       ["--adapter", str(out), "--merge", "--merged_dir", str(target), "--overwrite_merged_dir"])
        assert "the adapter's directory" in line or "inside the training run directory" in line, line
    assert _snapshot(out) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.bin").write_text("the user's")
    line = refused(capsys, generate.main, (generate.GenerateArguments,),
                   ["--adapter", str(out), "--merge", "--merged_dir", str(mine), "--overwrite_merged_dir"])
    assert "holds files that --merge did not write" in line
    merged = tmp_path / "merged"
    for flags in ([], ["--overwrite_merged_dir"]):  # a merge, then a merge replacing it
        generate.main(cli.parse(generate.GenerateArguments, argv=["--adapter", str(out), "--merge", "--merged_dir",
                                                                  str(merged), *flags])[0])
        assert (merged / "model.safetensors").is_file() and (merged / "merge.json").is_file()


# -- generate.py's inputs, outputs and evaluation -----------------------------------------------------------------
def test_generate_refuses_what_would_fail_after_loading(finished_run, tmp_path, capsys):
    out = copy_of(finished_run, tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Write function number {n} for me.", "completion": f"f{n}"})
                             + "\n" for n in range(8)))
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"q{n}", "answer": f"a{n}"}) + "\n" for n in range(8)))
    cases = [
        (["--evaluate", "--seq_length", "100000"], "above the model's maximum of 1024 positions"),
        (["--evaluate", "--dataset", str(pairs), "--seq_length", "2"], "none of the held-out examples keeps a"),
        (["--prompt", "a", "--prompt", "b"], "--prompt is given twice"),
        (["--prompt", "a", "--max_new_tokens", "5", "--max-new-tokens", "6"], "--max-new-tokens is given twice"),
        (["--evaluate", "--prompt_column", "question"], "name --dataset's columns; give --dataset too"),
        (["--humaneval_limit", "200"], "--humaneval_limit must be 0 (all 164 problems) to 164"),
        (["--prompt", "a", "--num_samples", "99999999999"], "--num_samples must be at most"),
    ]
    for extra, message in cases:
        line = refused(capsys, generate.main, (generate.GenerateArguments,), ["--adapter", str(out), *extra])
        assert message in line, (extra, line)
    # the advice for other columns works
    results = generate.main(cli.parse(generate.GenerateArguments, argv=[
        "--adapter", str(out), "--quantization", "none", "--evaluate", "--dataset", str(qa), "--prompt_column",
        "question", "--completion_column", "answer"])[0])
    assert results["evaluation"]["adapter_loss"] > 0
    (out / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    line = refused(capsys, generate.main, (generate.GenerateArguments,), ["--adapter", str(out), "--prompt", "a"])
    assert "adapter_model.safetensors is damaged" in line


def test_evaluating_the_runs_own_data_after_it_changed_is_refused(tmp_path, capsys):
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps({"text": f"def f{n}(x):\n    return {n} * x"}) + "\n" for n in range(30)))
    base_example.main(tiny_args(tmp_path / "out", dataset=str(data_file), max_train_steps=1, eval_steps=1))
    with open(data_file, "a") as f:
        f.write(json.dumps({"text": "a new row"}) + "\n")
    line = refused(capsys, generate.main, (generate.GenerateArguments,),
                   ["--adapter", str(tmp_path / "out"), "--evaluate"])
    assert "changed since the run trained on it" in line


# -- the sweep ----------------------------------------------------------------------------------------------------
def test_a_rerun_sweep_measures_no_finished_configuration_again(tmp_path, capsys):
    speed = karpathy_speedups_example.SpeedupArguments(num_workers=0)
    args = tiny_args(tmp_path / "sweep", max_train_steps=3, seq_length=32)
    karpathy_speedups_example.main(args, speed, SweepArguments(sweep_batch_sizes="2"))
    result = tmp_path / "sweep" / "bs2-w0-pin1-pack0-ckpt0" / "result.json"
    measured = result.read_bytes()
    capsys.readouterr()
    for sweeping in (SweepArguments(sweep_batch_sizes="2"), SweepArguments(sweep_batch_sizes="2", sweep_index=0)):
        karpathy_speedups_example.main(args, speed, sweeping)  # a rerun, and a retried Indexed Job pod
        assert "bs2-w0-pin1-pack0-ckpt0: measured already (ok)" in capsys.readouterr().out
        assert result.read_bytes() == measured


def test_merging_leaves_a_damaged_result_out_of_the_table_with_one_warning(tmp_path, capsys):
    from finetune import sweep

    config = dict(batch_size=2, num_workers=0, pin_memory=True, packing=False, gradient_checkpointing=False)
    sweep.write_result(str(tmp_path / "pod-0"), config, "ok", {"tokens_per_second": 100.0, "model_tflops": 1.0})
    _write(tmp_path / "pod-1" / "result.json", '{"name": "bs4-w0-pin1-pack0-ckpt0"')  # cut short by a lost node
    rows = karpathy_speedups_example.main(tiny_args(tmp_path / "merged"), karpathy_speedups_example.SpeedupArguments(),
                                          SweepArguments(merge_results=[str(tmp_path)]))
    assert [row["name"] for row in rows] == ["bs2-w0-pin1-pack0-ckpt0"]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {tmp_path / 'pod-1' / 'result.json'} is not a result this sweep wrote; leaving it "
                        f"out of the table"]


SWEEP_INPUTS = [
    (lambda d: ["--dataset", str(d / "missing.jsonl"), "--sweep_batch_sizes", "2"], "does not exist"),
    (lambda d: ["--merge_results", str(d / "nowhere")], "is not a directory"),
    (lambda d: ["--merge_results", str(d)], "no result.json in"),
    (lambda d: ["--output_dir", _write(d / "a-file", "x"), "--sweep_batch_sizes", "2"], "is a file"),
    (lambda d: ["--sweep_batch_sizes", "2,4,2"], "lists 2 more than once"),
    (lambda d: ["--sweep_batch_sizes", "4096"], "'4096' is not a positive integer"),
    (lambda d: ["--num_train_epochs", "2", "--sweep_batch_sizes", "2"], "give --max_train_steps"),
    (lambda d: ["--merge_results", str(d), "--sweep_batch_sizes", "2"], "leave out the --sweep_* settings"),
    (lambda d: ["--output_dir", str(Path(_write(d / "mine" / "notes.txt", "x")).parent), "--sweep_batch_sizes", "2"],
     "holds other files (notes.txt) and no run to resume"),
    (lambda d: ["--max_train_steps", "2", "--sweep_batch_sizes", "1,2"], "--max_train_steps 2 leaves none"),
]


@pytest.mark.parametrize("make_argv,message", SWEEP_INPUTS)
def test_a_sweeps_inputs_are_checked_before_the_first_configuration(tmp_path, capsys, make_argv, message):
    argv = with_flags([*TINY, "--output_dir", str(tmp_path / "sweep")], make_argv(tmp_path))
    before = _snapshot(tmp_path)
    line = refused(capsys, karpathy_speedups_example.main,
                   (TrainArguments, karpathy_speedups_example.SpeedupArguments, SweepArguments), argv)
    assert message in line, line
    assert _snapshot(tmp_path) == before


def test_sigterm_while_a_configuration_loads_stops_the_sweep(tmp_path):
    out = tmp_path / "sweep"
    parent = subprocess.Popen(
        [sys.executable, "karpathy_speedups_example.py", *TINY, "--num_workers", "0", "--max_train_steps", "3",
         "--sweep_batch_sizes", "2,4", "--output_dir", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in parent.stdout:
        if line.startswith("[sweep 1/2] bs2"):  # the child has started and is loading
            break
    time.sleep(0.5)
    parent.send_signal(signal.SIGTERM)
    _, errors = parent.communicate(timeout=120)
    assert parent.returncode == 128 + signal.SIGTERM, errors[-2000:]
    assert "sweep stopped during bs2-w0-pin1-pack0-ckpt0" in errors
    assert json.loads((out / "bs2-w0-pin1-pack0-ckpt0" / "result.json").read_text())["status"] == "stopped"
    assert not (out / "bs4-w0-pin1-pack0-ckpt0").exists()


# -- a write that fails -------------------------------------------------------------------------------------------
def test_write_failures_are_one_line_naming_the_path_the_cause_and_the_last_checkpoint(tmp_path, monkeypatch):
    from finetune import files
    from finetune.errors import WriteFailed

    # A disk cannot fill here: these raise what the writers raise on a full one.
    def torch_on_a_full_disk():  # torch.save's words for it: no path, no errno
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    def python_on_a_full_disk():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "manifest.json"))

    # torch says only "unexpected pos": the file system's free space says why (none: the disk is full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))
    for attempt in (torch_on_a_full_disk, python_on_a_full_disk):
        with pytest.raises(WriteFailed) as failure:
            with files.writes_into(str(tmp_path), lambda: "checkpoint-4"):
                attempt()
        assert "No space left on device" in str(failure.value) and "checkpoint-4" in str(failure.value)
    with pytest.raises(ZeroDivisionError):  # anything else is not turned into a line
        with files.writes_into(str(tmp_path), lambda: None):
            1 / 0


def test_a_full_disk_at_a_checkpoint_ends_in_one_line(tmp_path):
    # The disk cannot fill here: saving the second checkpoint's optimizer fails as torch.save does on a full disk,
    # and the file system reports no space left.
    prelude = ("import shutil, torch, types; _save = torch.save\n"
               "def save(obj, f, *a, **k):\n"
               "    if 'checkpoint-4/optimizer' in str(f):\n"
               "        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598')\n"
               "    return _save(obj, f, *a, **k)\n"
               "torch.save = save\n"
               "shutil.disk_usage = lambda path: types.SimpleNamespace(free=0)\n")
    code = (f"import sys; sys.argv = ['base_example.py'] + {[*TINY, '--max_train_steps', '4', '--eval_steps', '2', '--output_dir', str(tmp_path / 'out')]!r}\n"  # noqa: E501
            f"{prelude}import runpy; runpy.run_path('base_example.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-2000:]
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("error: could not write ") and "No space left on device" in line
    assert f"the last complete checkpoint is {tmp_path / 'out' / 'checkpoint-2'}" in line
