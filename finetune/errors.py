"""How the toolkit says something went wrong: bad input (exit 2), a stop by signal, and a child process's failure."""

import re


class UsageError(Exception):
    """Bad input from the user: the message says what was wrong and what to do. Printed as one `error: ...` line,
    exit status 2, never a traceback."""


class Stopped(Exception):
    """A run stopped by a signal after writing its checkpoint; exits 128 + the signal number, as a shell would."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WriteFailed(Exception):
    """A write the run needed failed (disk full, read-only, permission): one `error: ...` line naming the path, the
    cause and the last complete checkpoint, exit status 1 (a retry may succeed once space is freed)."""


class Finished(Exception):
    """The run in --output_dir already finished with this configuration: the rerun changes nothing and exits 0 (a
    Kubernetes Job that retries a pod after training finished must not train further)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# A child's last word: our own `error: ...` line, or a Python exception line (under torchrun prefixed `[rankN]:`).
_EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?(error|[\w.]*(Error|Exception)): \S")
_OUT_OF_MEMORY = re.compile(r"out of memory|OutOfMemoryError", re.IGNORECASE)


def child_failure(stderr: str) -> tuple[str, str]:
    """(status, message) of a child process that failed: `oom` or `error`, with its exception's line (the last one
    printed, so a launcher's summary after it does not hide it), at most 300 characters."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    found = [line for line in lines if _EXCEPTION_LINE.match(line)][-1:] or lines[-1:] or ["no output"]
    return ("oom" if _OUT_OF_MEMORY.search(stderr) else "error"), found[0][:300]
