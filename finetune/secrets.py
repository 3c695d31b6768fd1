"""Secrets (Hub tokens, W&B keys) kept out of everything a run writes or prints."""

import dataclasses
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


def scrub_argv(arguments=()) -> None:
    """Replace secret values on this process's command line, which W&B records with every run: values of secret-named
    flags, the parsed values of the argument dataclasses' secret fields (however the flag was spelled), and anything
    `redact` catches. The OS's own view of the command line cannot be changed from inside: prefer $HF_TOKEN to
    --hf_token."""
    parsed = [getattr(a, f.name) for a in arguments for f in dataclasses.fields(a)
              if SECRET_NAME.search(f.name) and isinstance(getattr(a, f.name), str) and getattr(a, f.name)]
    argv = sys.argv
    for index, argument in enumerate(argv):
        for value in parsed:
            argument = argument.replace(value, "***")
        flag, _, value = argument.partition("=")
        if flag.startswith("--") and SECRET_NAME.search(flag):
            if value:
                argument = f"{flag}=***"
            elif index + 1 < len(argv):
                argv[index + 1] = "***"
        argv[index] = redact(argument)
