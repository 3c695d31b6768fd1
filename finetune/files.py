"""Files the toolkit writes and reads back. Written whole (a reader sees the old content or the new) with the
process's umask; read back as untrusted input: a file that is missing its content, hand-edited into the wrong shape,
a directory, or a symbolic link the toolkit did not create is named in one `error:` line that says what to do."""

import json
import os
from pathlib import Path

from .errors import UsageError, first_line


def fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old content or the new, never part of it."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    fsync(temporary)
    os.replace(temporary, path)


def refuse_link(path: Path, what: str) -> None:
    """A symbolic link where the toolkit keeps its own file is refused: it would read or write what it points to."""
    if path.is_symlink():
        raise UsageError(f"{path} ({what}) is a symbolic link; the toolkit never follows a link it did not create: "
                         f"remove it")


def read_json(path: Path, what: str, remedy: str, shape: type = dict):
    """The JSON value a toolkit file holds, of the given shape; anything else is one error line naming the file,
    what is wrong, and `remedy`."""
    refuse_link(path, what)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"{path} ({what}) cannot be read ({first_line(error)[:120]}): {remedy}") from None
    if not isinstance(value, shape):
        raise UsageError(f"{path} ({what}) holds a JSON {type(value).__name__}, not a JSON "
                         f"{'object' if shape is dict else shape.__name__}: {remedy}")
    return value


def writable(directory: Path) -> str | None:
    """Why files cannot be written in `directory` (or the nearest parent that exists), or None if they can. A
    temporary directory is made and removed at once: permission bits say nothing under /proc or on a read-only
    mount, and nothing at all to root."""
    import tempfile

    directory = Path(directory).absolute()
    ancestor = next(p for p in [directory, *directory.parents] if p.exists())
    if not ancestor.is_dir():
        return f"{ancestor} is a file"
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write-test-"))
    except OSError as error:
        return f"{ancestor}: {first_line(error)}"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share(path: Path) -> None:
    """Give `path` (a file, or a directory and everything in it) the modes the process's umask gives new files,
    0644 and 0755 by default: safetensors writes 0600 and mkdtemp 0700, which another user of a shared volume, or a
    serving pod with another uid, cannot read."""
    mask = _umask()
    for item in [Path(path), *(Path(path).rglob("*") if Path(path).is_dir() else [])]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
