"""What a run was: its arguments, library versions, git commit, GPU and final metrics, with secrets removed."""

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

SECRET_ENVIRONMENT = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
SECRET_NAME = re.compile(r"token|api_key|secret|password", re.IGNORECASE)
# Hugging Face tokens start with hf_; W&B API keys are 40 hex digits (86 with the new prefix format).
SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{8,}|\b[0-9a-f]{40}\b|\b[\w-]{3,}-[0-9a-f]{40,}\b")
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate", "wandb")


def redact(value, name: str = ""):
    """`value` with every secret replaced by "***": by field name, by the environment's secret values, by shape."""
    if isinstance(value, dict):
        return {key: redact(item, str(key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item, name) for item in value]
    if not isinstance(value, str):
        return value
    if value and SECRET_NAME.search(name):
        return "***"
    for variable in SECRET_ENVIRONMENT:
        secret = os.environ.get(variable)
        if secret:
            value = value.replace(secret, "***")
    return SECRET_VALUE.sub("***", value)


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


def write(output_dir: str, arguments: list, metrics: dict) -> Path:
    manifest = {
        "arguments": {type(a).__name__: dataclasses.asdict(a) for a in arguments},
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "git_commit": _git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "metrics": metrics,
    }
    path = Path(output_dir) / "manifest.json"
    path.write_text(json.dumps(redact(manifest), indent=1, default=str))
    return path
