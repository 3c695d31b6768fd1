"""Run base_with_tflops.py under torchrun with one test-only callback: after every optimizer step, each rank
writes a digest of its LoRA weights, their device, and the GPUs its process holds memory on to
<output_dir>/../lora-rank<R>.jsonl."""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import base_with_tflops  # noqa: E402
import torch  # noqa: E402
from finetune import cli, training  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


def gpus_holding_this_process() -> list[int]:
    """GPUs where this process holds memory, as the driver (NVML) sees it: a stray CUDA context counts too."""
    if not torch.cuda.is_available():
        return []
    import pynvml

    pynvml.nvmlInit()
    return [index for index in range(pynvml.nvmlDeviceGetCount())
            if os.getpid() in {process.pid for process in pynvml.nvmlDeviceGetComputeRunningProcesses(
                pynvml.nvmlDeviceGetHandleByIndex(index))}]


class LoraDigest(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_step_end(self, args, state, control, model=None, **kwargs):
        digest = hashlib.sha256()
        lora = [parameter for name, parameter in sorted(model.named_parameters()) if "lora_" in name]
        for parameter in lora:
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
        row = {"step": state.global_step, "digest": digest.hexdigest(), "device": str(lora[0].device),
               "gpus": gpus_holding_this_process()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


build = training.build_trainer


def build_with_probe(args, *positional, callbacks=(), **keywords):
    probe = LoraDigest(Path(args.output_dir).parent / f"lora-rank{os.environ['RANK']}.jsonl")
    return build(args, *positional, callbacks=[*callbacks, probe], **keywords)


training.build_trainer = build_with_probe
cli.run(base_with_tflops.main, cli.TrainArguments, argv=sys.argv[1:])
