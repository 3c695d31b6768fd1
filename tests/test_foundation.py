"""The tutorial's scripts on the embedded default: real bitsandbytes, peft, Trainer and W&B offline, at tiny scale."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import base_example
import base_with_tflops
import karpathy_speedups_example
from conftest import ROOT, tiny_args, with_flags
from finetune import cli, embedded, modeling
from finetune.cli import TrainArguments
from wandb_records import history, offline_runs


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def base_weights(model) -> dict[str, torch.Tensor]:
    return {name.replace("base_model.model.", "").replace(".base_layer", ""): p.detach().clone()
            for name, p in model.named_parameters() if "lora_" not in name}


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_base_example_trains_lora_on_a_quantized_base(tmp_path, few_examples, quantization):
    args = tiny_args(tmp_path / "out", dataset=few_examples, quantization=quantization, batch_size=2,
                     max_train_steps=12, eval_steps=4, learning_rate=1e-2, lora_dropout=0.0)
    trainer = base_example.main(args)
    model = trainer.model

    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] - 0.5, losses  # the same two examples every step: the loss must fall

    layer = model.base_model.model.transformer.h[0].attn.c_attn.base_layer
    expected_layer = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[quantization]
    assert type(layer).__name__ == expected_layer
    fresh = modeling.load_quantized("tiny-starcoder", quantization)
    fresh_weights = base_weights(fresh)
    for name, weight in base_weights(model).items():
        if "c_attn" in name or "c_proj" in name:
            assert torch.equal(weight, fresh_weights[name]), f"base weight {name} changed"
    assert any(p.abs().sum() > 0 for name, p in lora_weights(model).items() if "lora_B" in name)  # B starts at 0

    out = Path(args.output_dir)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    everything = [p.name for p in out.rglob("*")]
    assert not {"model.safetensors", "pytorch_model.bin"} & set(everything), "a full model was saved"
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    final = {name.replace(".default", ""): p for name, p in lora_weights(model).items()}
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[name], final[name].cpu()) for name in saved), "best adapter not loaded at the end"


def test_base_with_tflops_logs_to_an_offline_wandb_run(tmp_path):
    args = tiny_args(tmp_path / "out", report_to="wandb", max_train_steps=6)
    base_with_tflops.main(args)
    assert os.environ["WANDB_MODE"] == "offline"
    runs = offline_runs(args.output_dir)
    assert len(runs) == 1
    rows = history(runs[0])
    logged = [row for row in rows if "train/achieved_tflops" in row]
    assert logged and all(row["train/achieved_tflops"] > 0 for row in logged)
    assert all("train/global_step" in row for row in logged)


def test_speedups_single_run_uses_its_knobs(tmp_path):
    args = tiny_args(tmp_path / "out", max_train_steps=4)
    speed = karpathy_speedups_example.SpeedupArguments(num_workers=1, pin_memory=True, memory_metrics=True)
    result = karpathy_speedups_example.main(args, speed)
    assert result["status"] == "ok" and result["tokens_per_second"] > 0
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["num_workers"] == 1 and saved["batch_size"] == 4


def test_embedded_model_has_starcoders_architecture():
    from transformers import AutoConfig

    path = embedded.tiny_model_path("tiny-starcoder")
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "gpt_bigcode" and config.multi_query
    assert config.activation_function == "gelu_pytorch_tanh"
    tokenizer = modeling.load_tokenizer("tiny-starcoder")
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == tokenizer.eos_token
    assert "<fim_prefix>" in tokenizer.get_vocab()
    rows = [json.loads(line) for line in open(embedded.stdlib_dataset_file())]
    assert len(rows) >= 1000 and set(rows[0]) == {"prompt", "completion"}
    assert all(row["completion"].startswith(("def ", "async def ", "@")) for row in rows)


def test_building_a_tiny_model_leaves_the_caller_s_random_state_alone(tmp_path, monkeypatch):
    """A first run builds its tiny model, a rerun finds it built: both must draw the same LoRA weights after a seed.
    And every build has the same weights."""
    built_before = embedded.tiny_model_path("tiny-starcoder")
    monkeypatch.setenv("STARCODER_LORA_CACHE", str(tmp_path))
    torch.manual_seed(5)
    state = torch.get_rng_state()
    built_now = embedded.tiny_model_path("tiny-starcoder")
    assert built_now.is_relative_to(tmp_path) and torch.equal(torch.get_rng_state(), state)
    assert load_file(built_now / "model.safetensors")["transformer.wte.weight"].equal(
        load_file(built_before / "model.safetensors")["transformer.wte.weight"])


@pytest.mark.parametrize("script", ["base_example", "base_with_tflops", "karpathy_speedups_example", "generate"])
def test_help_works(script, capsys):
    import generate

    types = {"karpathy_speedups_example": (TrainArguments, karpathy_speedups_example.SpeedupArguments),
             "generate": (generate.GenerateArguments,)}.get(script, (TrainArguments,))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda *args: None, *types, argv=["--help"])
    assert exit_info.value.code == 0
    assert "--quantization" in capsys.readouterr().out


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = [
    (lambda d: ["--model", str(d / "no-such-model")], "could not load model"),
    (lambda d: ["--model", "nobody/no-such-model"], "could not load model"),
    (lambda d: ["--dataset", str(d / "missing.jsonl")], "does not exist"),
    (lambda d: ["--dataset", "nobody/no-such-dataset"], "could not load dataset"),
    (lambda d: ["--dataset", _write(d / "cols.jsonl", '{"question": "q", "answer": "a"}\n')],
     "it needs prompt and completion"),
    (lambda d: ["--dataset", _write(d / "empty.csv", "prompt,completion\n")], "is empty"),
    (lambda d: ["--dataset", _write(d / "empty.jsonl", "")], "is empty"),
    (lambda d: ["--dataset", _write(d / "corrupt.jsonl", '{"prompt": "unterminated\n')], "could not read dataset file"),
    (lambda d: ["--batch_size", "0"], "--batch_size must be a positive integer"),
    (lambda d: ["--max_train_steps", "-3"], "--max_train_steps must be a positive integer"),
    (lambda d: ["--lora_target_modules", "q_attn"], "match no layer of this model"),
    (lambda d: ["--max_steps", "5"], "unknown arguments"),
    (lambda d: ["--seq_length", "4096"], "above 'tiny-starcoder''s maximum of 1024 positions"),
    (lambda d: ["--output_dir", _write(d / "a-file", "keep me")], "is a file"),
    (lambda d: ["--output_dir", str(Path(_write(d / "a-file", "keep me")) / "out")], "cannot be written"),
    (lambda d: ["--prompt_column", "question"], "it needs question and completion"),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("make_argv,message", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, make_argv, message):
    out = tmp_path / "out"
    argv = with_flags(["--model", "tiny-starcoder", "--dataset", "stdlib-code", "--report_to", "none",
                       "--output_dir", str(out)], make_argv(tmp_path))
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(base_example.main, TrainArguments, argv=argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert _snapshot(tmp_path) == before, "bad input must not write anything"


def test_quantization_that_bitsandbytes_cannot_run_here_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it: import fails
    with pytest.raises(SystemExit) as exit_info:
        cli.run(base_example.main, TrainArguments, argv=["--model", "tiny-starcoder", "--dataset", "stdlib-code",
                                                         "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--quantization 4bit needs bitsandbytes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "base_example.py", "--batch_size", "0", "--output_dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert "error: --batch_size must be a positive integer" in done.stderr
    assert "Traceback" not in done.stderr
