"""DDP on the CPU: two real torchrun processes on gloo train the 4-bit tiny StarCoder in step. On a machine with two
GPUs, the same under NCCL (each rank on its own GPU) and FSDP-QLoRA through `accelerate launch`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from finetune import checkpointing
from wandb_records import history, offline_runs

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TINY_RUN = ["--model", "tiny-starcoder", "--dataset", "stdlib-code", "--quantization", "4bit", "--seq_length", "64",
            "--completion_only_loss", "false", "--batch_size", "2", "--max_train_steps", "6", "--eval_steps", "6",
            "--logging_steps", "2"]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def launch(command: list[str]) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("WANDB_DIR", "WANDB_MODE")}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "effective batch size: 2 per device x 2 processes = 4 sequences per step" in done.stdout
    return done


def probe_rows(directory) -> list[list[dict]]:
    """Per rank, what tests/helpers/ddp_probe.py wrote after each step."""
    rows = [[json.loads(line) for line in open(directory / f"lora-rank{rank}.jsonl")] for rank in (0, 1)]
    assert [row["step"] for row in rows[0]] == list(range(1, 7))
    digests = [[row["digest"] for row in rank] for rank in rows]
    assert digests[0] == digests[1], "the ranks' LoRA weights diverged: gradients were not all-reduced"
    assert len(set(digests[0])) == 6, "the weights must change every step"
    return rows


def test_torchrun_two_processes_train_one_adapter(tmp_path):
    out = tmp_path / "out"
    done = launch([*TORCHRUN, "tests/helpers/ddp_probe.py", *TINY_RUN, "--report_to", "wandb",
                   "--output_dir", str(out)])
    probe_rows(tmp_path)

    assert [c.name for c in checkpointing.complete_checkpoints(str(out))] == ["checkpoint-6"]
    assert sorted(p.name for p in (out / "checkpoint-6").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    runs = offline_runs(str(out))
    assert len(runs) == 1, runs
    logged = [row for row in history(runs[0]) if "train/world_tokens_per_second" in row]
    assert logged and all(row["train/world_tokens_per_second"] > row["train/tokens_per_second"] for row in logged)
    assert (out / "manifest.json").is_file() and done.stdout.count("held-out loss over ") == 1
    # the world's throughput; two CPU processes here, not GPUs
    assert "tokens/s per process (" in done.stdout and "tokens/s in all)" in done.stdout


@two_gpus
def test_each_rank_trains_on_its_own_gpu(tmp_path):
    launch([*TORCHRUN, "tests/helpers/ddp_probe.py", *TINY_RUN, "--report_to", "none",
            "--output_dir", str(tmp_path / "out")])
    for rank, rows in enumerate(probe_rows(tmp_path)):
        # Not GPU 0 for everyone, and no stray CUDA context there either.
        assert {(row["device"], tuple(row["gpus"])) for row in rows} == {(f"cuda:{rank}", (rank,))}


@two_gpus
def test_fsdp_qlora_on_two_gpus_saves_the_trained_adapter(tmp_path):
    from peft import PeftModel

    from finetune import modeling

    out = tmp_path / "out"
    done = launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate/fsdp_qlora.yaml",
                   "base_with_tflops.py", *TINY_RUN, "--report_to", "none", "--output_dir", str(out)])
    assert "tokens/s per GPU (" in done.stdout and "tokens/s in all)" in done.stdout  # the world's throughput
    # Loaded the way generate.py loads it: a key peft does not recognise would leave its B at zero, silently.
    model = PeftModel.from_pretrained(modeling.load_quantized("tiny-starcoder", "4bit"), out)
    lora_b = [parameter for name, parameter in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(parameter.abs().sum() > 0 for parameter in lora_b), "LoRA's B starts at zero: not trained"
    assert [c.name for c in checkpointing.complete_checkpoints(str(out))] == ["checkpoint-6"]


def test_fsdp_launch_stores_4bit_weights_in_the_compute_dtype(monkeypatch):
    import torch

    from finetune import modeling

    plain = modeling.load_quantized("tiny-starcoder", "4bit")
    assert plain.transformer.h[0].attn.c_attn.weight.dtype == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    sharded = modeling.load_quantized("tiny-starcoder", "4bit")
    assert sharded.transformer.h[0].attn.c_attn.weight.dtype == modeling.compute_dtype()
    assert type(sharded.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"


def test_scaling_bench_runs_one_and_two_processes(tmp_path):
    out = tmp_path / "scaling.json"
    done = subprocess.run(
        [sys.executable, "bench/ddp_scaling.py", "--size", "tiny", "--recipes", "fast", "--gpus", "1,2",
         "--steps", "2", "--warmup", "1", "--seq_length", "32", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = json.loads(out.read_text())["results"]
    assert (one["gpus"], two["gpus"]) == (1, 2) and one["batch_size"] == two["batch_size"]
    assert one["efficiency"] == 1.0
    assert two["world_tokens_per_second"] == 2 * two["tokens_per_second"]
    assert abs(two["efficiency"] - two["world_tokens_per_second"] / (2 * one["tokens_per_second"])) < 1e-9
    assert "efficiency" in done.stdout
