"""What a run was: its arguments, library versions, git commit, GPU and final metrics, with secrets removed."""

import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .files import write_atomically
from .secrets import redact

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "wandb")


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def provenance() -> dict:
    """Where a figure came from: library versions, git commit, device and host, date and command line. The benches
    write it beside their results, the training scripts into manifest.json."""
    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "git_commit": _git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "gpu_count": torch.cuda.device_count(),
        # the host too: with the same GPU model, `lean_fp8` within 11.5 GiB ran at 4,441 to 7,112 tokens/s on three
        # machines, where a batch-1 step's small kernels leave the host's launch time exposed (issue 21; H100,
        # 2026-12-07, docs/PERFORMANCE.md)
        "host": {"cpu": _cpu(), "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }


def write(output_dir: str, arguments: list, metrics: dict, outputs: dict[str, list] | None = None,
          best_checkpoint: str | None = None) -> Path:
    """The finished run's record: arguments, provenance, final metrics, the files it wrote at the top of its output
    directory with their size and SHA-256 (what --overwrite_output_dir removes, and how a rerun verifies the final
    adapter), and the checkpoint the adapter came from (to rebuild it from)."""
    manifest = {"arguments": {type(a).__name__: dataclasses.asdict(a) for a in arguments}, **provenance(),
                "metrics": metrics, "outputs": outputs or {}, "best_checkpoint": best_checkpoint}
    path = Path(output_dir) / "manifest.json"
    write_atomically(path, json.dumps(redact(manifest), indent=1, default=str))
    return path
