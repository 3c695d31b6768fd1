"""Secrets (Hub tokens, W&B keys) kept out of everything a run writes or prints."""

import os
import re
import sys

SECRET_ENVIRONMENT = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
SECRET_NAME = re.compile(r"token|api_key|secret|password", re.IGNORECASE)
# Hugging Face tokens start with hf_. W&B keys have no distinctive shape (40 hex digits, like a git commit), so
# they are caught by name and by the value of $WANDB_API_KEY.
SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{8,}")


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


def scrub_argv() -> None:
    """Replace secret values on this process's command line, which W&B records with every run (the OS's own
    view of the command line cannot be changed from inside; prefer $HF_TOKEN to --hf_token)."""
    argv = sys.argv
    for index, argument in enumerate(argv):
        flag, _, value = argument.partition("=")
        if flag.startswith("--") and SECRET_NAME.search(flag):
            if value:
                argv[index] = f"{flag}=***"
            elif index + 1 < len(argv):
                argv[index + 1] = "***"
        else:
            argv[index] = redact(argument)
