"""The environment is input too: every variable the toolkit reads, or that changes what its libraries do, is checked
here, after the arguments parse and before anything is written, and a bad one is one `error:` line."""

import math
import os
import re
import tempfile
from pathlib import Path

from .errors import UsageError, first_line
from .files import writable

WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run")
BOOLEANS = ("", "0", "1", "false", "true", "no", "yes", "off", "on")
SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for each process


def _directory(variable: str, default: Path | None = None) -> None:
    value = os.environ.get(variable)
    path = Path(value) if value else default
    if value is not None and not value.strip():
        raise UsageError(f"${variable} is set but empty; unset it, or point it at a writable directory")
    why = writable(path) if path is not None else None
    if why:
        raise UsageError(f"${variable} ({path}) cannot be written ({why}); point it at a writable directory")


def _wandb_accepts_its_variables() -> None:
    """W&B checks its WANDB_* variables (a project name, tags, a run id) only as the run starts, after files are
    written: ask it now."""
    import pydantic
    import wandb

    try:
        wandb.Settings().update_from_env_vars(dict(os.environ))
    except wandb.errors.UsageError as error:
        raise UsageError(f"W&B refuses a WANDB_* variable: {first_line(error)}; fix or unset it") from None
    except pydantic.ValidationError as error:
        problem = error.errors()[0]
        raise UsageError(f"W&B refuses a WANDB_* variable (its {problem['loc'][0]} setting): {problem['msg']}; fix "
                         f"or unset it") from None


def _launcher_variables() -> None:
    """torchrun's variables (accelerate launch sets the same), whole and consistent. Set by hand or left over in a
    shell, they failed deep in torch.distributed (LOCAL_RANK without MASTER_ADDR), and a RANK of 1 alone made the run
    skip the output directory's lock, which only rank 0 takes."""
    fix = "launch with torchrun or accelerate launch, which set these, or unset them"
    numbers = {}
    for name, least in (("RANK", 0), ("LOCAL_RANK", -1), ("WORLD_SIZE", 1)):  # LOCAL_RANK -1: not distributed
        if name in os.environ:
            value = os.environ[name].strip()
            if not re.fullmatch(r"-?[0-9]{1,6}", value) or int(value) < least:
                raise UsageError(f"${name} must be a whole number, {least} or more, got {os.environ[name]!r}; {fix}")
            numbers[name] = int(value)
    world = numbers.get("WORLD_SIZE", 1)
    if numbers.get("LOCAL_RANK", -1) >= 0 or world > 1:
        missing = [f"${name}" for name in LAUNCHER if not os.environ.get(name, "").strip()]
        if missing:
            raise UsageError(f"a distributed run (${'WORLD_SIZE' if world > 1 else 'LOCAL_RANK'} is set) needs "
                             f"{', '.join(missing)} too; {fix}")
    for name in ("RANK", "LOCAL_RANK"):
        if numbers.get(name, -1) >= world:
            raise UsageError(f"${name} ({numbers[name]}) must be below $WORLD_SIZE ({world}); {fix}")


def check(uses_wandb: bool) -> None:
    for name in SECRETS:
        value = os.environ.get(name)
        if value is not None and (not value or value != value.strip() or any(c.isspace() for c in value)):
            raise UsageError(f"${name} holds spaces or line breaks (a secret file's trailing newline?); set it to "
                             f"the token alone")
    peak = os.environ.get("PEAK_TFLOPS")
    if peak is not None:
        try:
            ok = math.isfinite(float(peak)) and float(peak) > 0
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"$PEAK_TFLOPS must be this GPU's dense bf16 peak in TFLOP/s, a positive number, got "
                             f"{peak!r}")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() not in BOOLEANS:
            raise UsageError(f"${name} must be 1 or 0 (true or false), got {os.environ[name]!r}")
    _launcher_variables()
    from .embedded import cache_dir

    _directory("STARCODER_LORA_CACHE", cache_dir())
    _directory("TMPDIR", Path(tempfile.gettempdir()))
    _directory("HF_HOME", Path.home() / ".cache" / "huggingface")
    _directory("HF_HUB_CACHE")  # models; by default under HF_HOME
    _directory("HF_DATASETS_CACHE")  # every data set's Arrow files, a local file's too
    if uses_wandb:
        mode = os.environ.get("WANDB_MODE")
        if mode is not None and mode.strip().lower() not in WANDB_MODES:
            raise UsageError(f"$WANDB_MODE must be one of {', '.join(WANDB_MODES)}, got {mode!r}; or leave it unset "
                             f"(online when a key is set and the server answers, else offline)")
        _directory("WANDB_DIR")
        for name in ("WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
            if name in os.environ and not os.environ[name].strip():
                raise UsageError(f"${name} is set but empty; unset it, or give it a value")
        url = os.environ.get("WANDB_BASE_URL")
        if url and not url.startswith(("http://", "https://")):
            raise UsageError(f"$WANDB_BASE_URL must be an http:// or https:// address, got {url!r}")
        _wandb_accepts_its_variables()

