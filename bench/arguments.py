"""The benches' command lines: argparse that answers a bad value in one line (`error: ...`, exit status 2) before
anything runs, as the training scripts do (finetune/cli.py), and the value types the benches share."""

import argparse
import math
import os
import sys
from pathlib import Path

from finetune.files import writable


def _refuse(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parser(description: str) -> argparse.ArgumentParser:
    """A bench's parser: its module docstring as --help, no abbreviated flags, one-line refusals."""
    bench = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                    allow_abbrev=False)
    bench.error = _refuse
    return bench


def at_least(minimum: int):
    """A whole number of at least `minimum`, as an argparse type."""

    def whole_number(text: str) -> int:
        value = int(text)  # argparse answers a ValueError with "invalid whole_number value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    return whole_number


def share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a share, 0 to 1, got {text}")
    return value


def gib(text: str) -> float:
    """GiB of GPU memory; 0 means no cap."""
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number of GiB, 0 (no cap) or more, got {text}")
    return value


def output_file(text: str) -> str:
    """A file the bench writes (--json, --plot): refused at the start if it could not be written, or if it exists (a
    rerun must not replace an earlier run's figures)."""
    if not text:
        return text
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file name")
    if os.path.lexists(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists (an earlier run's?); give a new name, or remove it")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{folder!r} is not a directory; create it first")
    why = writable(Path(folder))
    if why:
        raise argparse.ArgumentTypeError(f"{folder!r} cannot be written ({why})")
    return text


def output_dir(text: str) -> str:
    """A directory the bench writes into (created if missing)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a directory")
    return text


def check_size(bench: argparse.ArgumentParser, family: str, size: str) -> None:
    from finetune.architecture import FAMILIES

    if size not in FAMILIES[family].sizes:
        bench.error(f"--size {size}: {family} has {', '.join(FAMILIES[family].sizes)}")
