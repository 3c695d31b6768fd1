"""Files the toolkit writes and reads back. Written whole (a reader sees the old content or the new) with the
process's umask; read back as untrusted input: a file that is missing its content, hand-edited into the wrong shape,
a directory, or a symbolic link the toolkit did not create is named in one `error:` line that says what to do."""

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path

from .errors import UsageError, WriteFailed, first_line


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


# A write that failed for want of space or permission, not a bug: each becomes one line (errors.WriteFailed).
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _write_failure(error: BaseException, directory: Path) -> tuple[str, str] | None:
    """(path, cause) when `error` is a write that failed for want of space or permission, else None. torch.save and
    safetensors report such failures in their own words, without the path."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return str(error.filename or directory), error.strerror or first_line(error)
    text = str(error)
    reported = re.search(r'message: "([^"]+)"', text)  # safetensors: IoError(Os { ..., message: "..." })
    if reported and "Os {" in text:
        return str(directory), reported.group(1)
    if "PytorchStreamWriter" in text or "inline_container" in text or "file write failed" in text:
        free = shutil.disk_usage(directory).free if directory.exists() else 0
        return str(directory), "No space left on device" if free < 64 * 2**20 else first_line(error)[:120]
    return None


@contextlib.contextmanager
def writes_into(directory: str, last_good):
    """Turn a failed write under `directory` into one line naming the path, the cause and `last_good()` (the last
    complete checkpoint), and saying how to go on."""
    try:
        yield
    except Exception as error:  # only write failures are turned into a line; anything else propagates as it was
        failure = _write_failure(error, Path(directory))
        if failure is None:
            raise
        path, cause = failure
        raise WriteFailed(f"could not write {path}: {cause}; the last complete checkpoint is {last_good() or 'none'}. "
                          f"Free space (or fix the permission) and run the same command again: it resumes from "
                          f"there") from None
