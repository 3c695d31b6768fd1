"""DDP on the CPU: two real torchrun processes on gloo train the 4-bit tiny StarCoder in step."""

import json
import os
import subprocess
import sys

from conftest import ROOT
from finetune import checkpointing
from wandb_records import history, offline_runs


def test_torchrun_two_processes_train_one_adapter(tmp_path):
    out = tmp_path / "out"
    env = {key: value for key, value in os.environ.items() if key not in ("WANDB_DIR", "WANDB_MODE")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "tests/helpers/ddp_probe.py", "--model", "tiny-starcoder", "--dataset", "stdlib-code", "--quantization",
         "4bit", "--seq_length", "64", "--batch_size", "2", "--max_train_steps", "6", "--eval_steps", "6",
         "--logging_steps", "2", "--report_to", "wandb", "--output_dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "effective batch size: 2 per device x 2 processes = 4 sequences per step" in done.stdout

    digests = [[json.loads(line) for line in open(tmp_path / f"lora-rank{rank}.jsonl")] for rank in (0, 1)]
    assert [row["step"] for row in digests[0]] == list(range(1, 7))
    assert digests[0] == digests[1], "the ranks' LoRA weights diverged: gradients were not all-reduced"
    assert len({row["digest"] for row in digests[0]}) == 6, "the weights must change every step"

    assert [c.name for c in checkpointing.complete_checkpoints(str(out))] == ["checkpoint-6"]
    assert sorted(p.name for p in (out / "checkpoint-6").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    runs = offline_runs(str(out))
    assert len(runs) == 1, runs
    logged = [row for row in history(runs[0]) if "train/world_tokens_per_second" in row]
    assert logged and all(row["train/world_tokens_per_second"] > row["train/tokens_per_second"] for row in logged)
    assert (out / "manifest.json").is_file() and done.stdout.count("held-out loss:") == 1


def test_fsdp_launch_stores_4bit_weights_in_the_compute_dtype(monkeypatch):
    import torch

    from finetune import modeling

    plain = modeling.load_model("tiny-starcoder", "4bit")
    assert plain.transformer.h[0].attn.c_attn.weight.dtype == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    sharded = modeling.load_model("tiny-starcoder", "4bit")
    assert sharded.transformer.h[0].attn.c_attn.weight.dtype == modeling.compute_dtype()
    assert type(sharded.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
