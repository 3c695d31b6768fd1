"""Off the happy path: bad input of every class ends with exit 2, one `error:` line and nothing written; reruns,
retries, torn checkpoints and concurrent runs never damage a result."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
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
    import pandas

    pandas.DataFrame({"prompt": [1, 2], "completion": [3, 4]}).to_parquet(root / "integers.parquet")
    (root / "binary.jsonl").write_bytes(b"\x00\xff\xfe\x81")
    return root


TRAINING = [  # (argv after the common ones, given the fixture's directory; a fragment of the one error line)
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
    (lambda d: ["--output_dir", ""], "--output_dir must not be empty"),
    (lambda d: ["--output_dir", "/proc/no-such/out"], "cannot be written"),
    (lambda d: ["--hf_tok", "PLANTEDtokenWithoutPrefix"], "unknown arguments"),
    (lambda d: ["--batch_size", "abc"], "invalid int value"),
    (lambda d: ["--quantization", "fp4"], "invalid choice"),
    (lambda d: ["--prompt_column", ""], "--prompt_column must not be empty"),
    (lambda d: ["--humaneval_limit", "-1"], "--humaneval_limit must be 0"),
]
SWEEP = [
    (["--sweep_batch_sizes", "1,abc"], "'abc' is not a positive integer"),
    (["--sweep_batch_sizes", "0"], "'0' is not a positive integer"),
    (["--sweep_packing", "maybe"], "'maybe' is not true or false"),
    (["--num_workers", "-1"], "--num_workers must be 0 or more"),
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


GENERATE = [  # (argv given the adapter and a scratch directory, fragment)
    (lambda a, d: ["--adapter", str(Path(_write(d / "adapter_config.json", "{not json")).parent), "--prompt", "x"],
     "(the adapter's configuration) cannot be read"),
    (lambda a, d: ["--adapter", str(Path(_write(d / "adapter_config.json", '{"peft_type": "LORA"}')).parent),
                   "--prompt", "x"], "names no base model"),
    (lambda a, d: ["--adapter", str(d / "none"), "--prompt", "x"], "holds no adapter"),
    (lambda a, d: ["--adapter", str(a), "--prompt", "word " * 2000], "the model has 1024"),
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


def test_an_unreachable_wandb_server_means_offline_with_one_warning(tmp_path):
    env = dict(os.environ, WANDB_API_KEY="0123456789abcdef0123456789abcdef01234567",
               WANDB_BASE_URL="http://127.0.0.1:9")  # a closed port: the connection is refused at once
    env.pop("WANDB_MODE", None)
    started = time.time()
    argv = [arg for arg in TINY if arg not in ("--report_to", "none")]
    done = subprocess.run([sys.executable, "base_example.py", *argv, "--max_train_steps", "2", "--eval_steps", "2",
                           "--output_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.time() - started < 100
    warnings = [line for line in done.stdout.splitlines() if "does not answer within 5 s" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert list((tmp_path / "out").glob("wandb/offline-run-*"))
    assert "upload with: wandb sync" in done.stdout


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
