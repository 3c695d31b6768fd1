"""What a person sees and reads: the quick start's output, --help, the W&B run's config, and a sweep's progress."""

import subprocess
import sys

import pytest

import base_with_tflops
import generate
import karpathy_speedups_example
from conftest import ROOT, tiny_args
from finetune import cli
from finetune.cli import TrainArguments
from finetune.sweep import SweepArguments
from wandb_records import config, offline_runs, records


def test_the_quick_start_prints_no_library_warning_and_ends_with_the_summary(tmp_path):
    done = subprocess.run([sys.executable, "base_with_tflops.py", "--model", "tiny-starcoder", "--dataset",
                           "stdlib-code", "--max_train_steps", "4", "--eval_steps", "4", "--output_dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    output = (done.stdout + done.stderr).splitlines()
    ours = ("warning: the held-out loss is over", "warning: throughput: only 2 measured step(s)")
    noise = [line for line in output if any(word in line.lower() for word in ("warn", "deprecat", "failed to load"))
             and not line.startswith(ours)]
    assert noise == [], noise
    assert not any("it/s]" in line or "\r" in line for line in output), "no progress bar redraws through a pipe"
    last = done.stdout.strip().splitlines()[-5:]
    assert last[0].startswith("done: 4 steps; adapter in ") and str(tmp_path / "out") in last[0]
    assert last[1].startswith("held-out loss over 64 examples: base ") and " -> adapter " in last[1]
    assert last[2].startswith("throughput: ") and "tokens/s" in last[2] and "model TFLOP/s" in last[2]
    # 4 steps leave 2 after the warm-up: the run says its tokens/s is no stable figure, as a sweep does
    assert last[3].startswith("warning: throughput: only 2 measured step(s), so its tokens/s is not a stable figure")
    run_dir = next((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert last[4] == f"W&B ran offline; upload with: wandb sync '{run_dir}'"
    steps = [line for line in output if line.startswith("step ")]
    assert steps and all("{" not in line and "'" not in line for line in steps), steps  # numbers, not dicts


SCRIPTS = {"base_example.py": (TrainArguments,), "karpathy_speedups_example.py": (
    TrainArguments, karpathy_speedups_example.SpeedupArguments, SweepArguments),
    "generate.py": (generate.GenerateArguments,)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_grouped_by_concern_with_examples_and_flags(script):
    done = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    text = done.stdout
    assert text.count(f"python {script}") >= 2, "two examples at the top"
    groups = {"base_example.py": ["model:", "data:", "LoRA:", "training:", "speed:", "output and resume:", "W&B:",
                                  "evaluation:"],
              "karpathy_speedups_example.py": ["speed-ups (Part 4):", "sweep (Part 4: the study):"],
              "generate.py": ["model:", "generation:", "held-out loss:", "HumanEval:", "merge:"]}[script]
    assert all(f"\n{group}\n" in text for group in groups), groups
    assert "(default: )" not in text and ")(default" not in text and "default: $HF_TOKEN) (default" not in text
    assert "[PACKING]" not in text and "--lora-r" not in text and "{,fast" not in text
    if script == "karpathy_speedups_example.py":
        assert "--no_pin_memory       Turn off --pin_memory." in text


def test_every_argument_sits_in_one_help_group():
    for types in SCRIPTS.values():
        for dataclass_type in types:
            groups = getattr(dataclass_type, "_help_groups", None)
            if groups is None:
                assert dataclass_type._argument_group_name
                continue
            named = [name for names in groups.values() for name in names]
            assert sorted(named) == sorted(f.name for f in dataclass_type.__dataclass_fields__.values())


def test_the_wandb_run_holds_every_argument_the_gpu_and_tags(tmp_path):
    args = tiny_args(tmp_path / "out", report_to="wandb", max_train_steps=2, eval_steps=2, recipe="fast",
                     seq_length=64, batch_size=2)
    base_with_tflops.main(args)
    (run,) = offline_runs(args.output_dir)
    saved = config(run)
    arguments = saved["arguments"]
    for name in ("recipe", "model", "dataset", "quantization", "packing", "seq_length", "batch_size", "lora_r",
                 "lora_alpha", "lora_dropout", "learning_rate", "gradient_accumulation_steps"):
        assert arguments[name] == getattr(args, name), name
    assert arguments["hf_token"] in ("", "***")
    assert saved["gpu"] == "cpu" and "gpu_peak_bf16_tflops" in saved
    (started,) = [record.run for record in records(run) if record.WhichOneof("record_type") == "run"]
    assert started.job_type == "train" and {"fast", "quantization:4bit", "train"} <= set(started.tags)


def test_a_sweep_shows_progress_and_warns_about_unstable_figures(tmp_path, capsys):
    rows = karpathy_speedups_example.main(tiny_args(tmp_path / "sweep", max_train_steps=4, seq_length=32,
                                                    logging_steps=1),
                                          karpathy_speedups_example.SpeedupArguments(num_workers=0),
                                          SweepArguments(sweep_batch_sizes="2"))
    output = capsys.readouterr().out
    assert "[sweep 1/1] bs2-w0-pin1-pack0-ckpt0" in output
    assert "[sweep 1/1] step 3/4" in output and "tokens/s" in output
    assert rows[0]["measured_steps"] == 2
    assert "[sweep 1/1] warning: bs2-w0-pin1-pack0-ckpt0: only 2 measured step(s)" in output


def test_run_parses_argv_of_every_script():
    for script, types in SCRIPTS.items():
        with pytest.raises(SystemExit) as exit_info:
            cli.run(lambda *args: None, *types, argv=["--help"])
        assert exit_info.value.code == 0, script
