"""Runs that survive preemption, retries and reruns: atomic checkpoints, verified resumption, one run per directory.

The Trainer writes each checkpoint into `<output_dir>/.staging/`; `CheckpointCallback.on_save` then writes a
completion marker listing every file's size and SHA-256, fsyncs, and renames the directory into
`<output_dir>/checkpoint-N`. A rename within one file system is atomic, so a run killed at any moment leaves either
the new checkpoint complete or none of it, and a checkpoint damaged later (a truncated file) no longer matches its
marker: resumption takes the newest checkpoint that verifies. The configuration is recorded with the first
checkpoint, so a run that fails before it leaves nothing to refuse; a lock file keeps a second process out of the
directory while a run holds it; and a run that finished (its manifest.json, written last) is not trained again.
"""

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from .errors import Finished, Stopped, UsageError, first_line
from .files import fsync, write_atomically

MARKER = "checkpoint.complete"
STAGING = ".staging"
RUN_CONFIG = "run_config.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
# What a run writes at the top of its output directory: removed by --overwrite_output_dir before the new run writes.
RUN_FILES = ("checkpoint-*", STAGING, RUN_CONFIG, MANIFEST, "adapter_config.json", "adapter_model.safetensors",
             "README.md", "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "wandb_run_id", "result.json",
             "humaneval.json")
# Arguments that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = {"output_dir", "report_to", "wandb_project", "max_train_steps", "logging_steps", "eval_steps",
                     "resume", "overwrite_output_dir", "grace_period_seconds", "hf_token", "recipe", "humaneval",
                     "humaneval_limit", "check_memory"}
_held_locks: dict[str, int] = {}  # this process's locks, by output directory: open descriptors


def holds_run(directory: Path) -> bool:
    """A training run's directory (its recorded configuration or its manifest), or one of its checkpoints."""
    return any((Path(directory) / name).is_file() for name in (RUN_CONFIG, MANIFEST, MARKER))


def staging(output_dir: str) -> str:
    return os.path.join(output_dir, STAGING)


def _step(path: Path) -> int:
    return int(re.search(r"checkpoint-(\d+)$", path.name).group(1))


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Committed checkpoints, oldest first. A directory without the marker is never among them."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / MARKER).is_file()]
    return sorted(found, key=_step)


def _files(directory: Path) -> dict[str, list]:
    """Every file under `directory` but the marker: relative path -> [size, SHA-256]."""
    record = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MARKER:
            with open(path, "rb") as f:
                record[str(path.relative_to(directory))] = [path.stat().st_size, hashlib.file_digest(f, "sha256")
                                                            .hexdigest()]
    return record


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a committed checkpoint (a file missing, truncated or changed), or None if it verifies."""
    try:
        expected = json.loads((checkpoint / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its completion marker is unreadable ({first_line(error)})"
    found = _files(checkpoint)
    for name, (size, digest) in expected.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != [size, digest]:
            return f"{name} does not match its recorded size and hash ({found[name][0]} of {size} bytes)"
    return None


def newest_intact(output_dir: str) -> Path | None:
    """The newest committed checkpoint that verifies; each damaged one on the way is named in one warning line."""
    for checkpoint in reversed(complete_checkpoints(output_dir)):
        problem = damage(checkpoint)
        if problem is None:
            return checkpoint
        print(f"warning: skipping {checkpoint.name}: {problem}", flush=True)
    return None


def comparable(args, data_fingerprint: str) -> dict:
    """The configuration a resumed run must share with the run it continues: every argument that changes what is
    trained, and the data's content."""
    values = {key: value for key, value in dataclasses.asdict(args).items() if key not in RESUMABLE_CHANGES}
    return {**values, "data_fingerprint": data_fingerprint}


def check_output_dir(output_dir: str) -> None:
    """An output directory that is a file, or cannot be created or written, stops the run before anything else. The
    nearest existing parent is probed with a temporary directory (removed at once): permission bits say nothing
    under /proc or on a read-only mount, and nothing at all to root."""
    path = Path(output_dir).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {output_dir!r} is a file; give a directory")
    ancestor = next(p for p in [path, *path.parents] if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write-test-"))
    except OSError as error:
        raise UsageError(f"--output_dir {output_dir!r} cannot be written ({ancestor}: {first_line(error)})") from None


def _check(args, config: dict) -> None:
    """Refuse a directory that holds a run of another configuration; stop (Finished) if it holds this run, done."""
    out = Path(args.output_dir)
    if args.overwrite_output_dir or not (out / RUN_CONFIG).is_file():
        return
    saved = json.loads((out / RUN_CONFIG).read_text())
    changed = {key: (saved.get(key), value) for key, value in config.items() if saved.get(key) != value}
    if changed:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
        raise UsageError(f"{args.output_dir!r} holds a run with another configuration ({details}); use another "
                         f"--output_dir, or --overwrite_output_dir to start over")
    if (out / MANIFEST).is_file():
        step = json.loads((out / MANIFEST).read_text()).get("metrics", {}).get("global_step", 0)
        if step >= args.max_train_steps:
            raise Finished(f"already finished: {step} steps with this configuration; the adapter is in "
                           f"{args.output_dir}. Raise --max_train_steps to train on, or use --overwrite_output_dir to "
                           f"start over.")


def claim(args, config: dict) -> str | None:
    """Check the output directory against this run's configuration and, on the first process, lock it for this
    run's lifetime. Returns the checkpoint to resume from (the newest intact one), or None. Read-only until the
    lock; checked again under it, since the process that held it may have changed the directory."""
    check_output_dir(args.output_dir)
    _check(args, config)
    if int(os.environ.get("RANK", 0)) == 0:
        _lock(args.output_dir)
    _check(args, config)
    latest = None if args.overwrite_output_dir else newest_intact(args.output_dir)
    if latest and args.resume == "never":
        raise UsageError(f"{args.output_dir!r} holds checkpoints and --resume is never; use --resume auto, another "
                         f"--output_dir, or --overwrite_output_dir")
    return str(latest) if latest else None


def _lock(output_dir: str) -> None:
    """An exclusive lock (flock: released by the kernel when its holder dies, SIGKILL included) on output_dir/.lock,
    which names its holder for the run it turns away."""
    key = os.path.abspath(output_dir)
    if key in _held_locks:  # this process holds it already (a test or notebook running twice)
        return
    os.makedirs(output_dir, exist_ok=True)
    descriptor = os.open(os.path.join(output_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(descriptor, 200).decode(errors="replace").strip() or "unknown"
        os.close(descriptor)
        raise UsageError(f"--output_dir {output_dir!r} is in use by another run ({holder}); wait for it to end, or "
                         f"use another --output_dir") from None
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    _held_locks[key] = descriptor


def release(output_dir: str) -> None:
    descriptor = _held_locks.pop(os.path.abspath(output_dir), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the last descriptor releases the flock


def start(args) -> None:
    """On the first process, once the input is valid and the directory locked: with --overwrite_output_dir remove
    what the previous run wrote (so nothing of it is mistaken for this run's), and clear what an interrupted save
    left in the staging area."""
    out = Path(args.output_dir)
    if args.overwrite_output_dir:
        for pattern in RUN_FILES:
            for old in out.glob(pattern):
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    shutil.rmtree(out / STAGING, ignore_errors=True)  # partial checkpoints of a killed run: never loaded
    out.mkdir(parents=True, exist_ok=True)


def commit(staged: Path, final: Path, best_step: int | None) -> None:
    """Mark (every file's size and hash), fsync and rename a staged checkpoint into place."""
    state_file = staged / "trainer_state.json"
    if state_file.is_file() and best_step:  # point the saved state at the best checkpoint's final place
        state = json.loads(state_file.read_text())
        state["best_model_checkpoint"] = str(final.parent / f"checkpoint-{best_step}")
        state_file.write_text(json.dumps(state, indent=2))
    (staged / MARKER).write_text(json.dumps({"step": _step(final), "files": _files(staged)}, indent=1))
    for file in staged.rglob("*"):
        if file.is_file():
            fsync(file)
    fsync(staged)
    if final.exists():  # the same step saved twice (a stop right after a scheduled save), or a damaged one
        shutil.rmtree(final)
    os.rename(staged, final)
    fsync(final.parent)


class CheckpointCallback(TrainerCallback):
    """Commits checkpoints atomically (recording the run's configuration with the first), keeps the newest `keep`
    plus the best, and turns SIGTERM/SIGINT into a stop after the step in flight with a checkpoint; past
    `grace_period` seconds the process exits regardless (the last committed checkpoint is intact)."""

    def __init__(self, output_dir: str, run_config: dict, keep: int = 2, grace_period: float = 25.0):
        self.output_dir, self.run_config, self.keep, self.grace_period = output_dir, run_config, keep, grace_period
        self.signal: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.previous_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self.previous_handlers[number] = signal.signal(number, self._request_stop)
        if state.best_global_step:  # resumed: the saved path may name the staging area
            state.best_model_checkpoint = os.path.join(self.output_dir, f"checkpoint-{state.best_global_step}")

    def _request_stop(self, number, frame):
        self.signal = number
        for other in (signal.SIGTERM, signal.SIGINT):  # a second signal stops at once
            signal.signal(other, signal.SIG_DFL)
        name = signal.Signals(number).name
        print(f"{name} received: finishing the current step and writing a checkpoint "
              f"(at most {self.grace_period:g} s)", flush=True)
        timer = threading.Timer(self.grace_period, self._out_of_time, args=(number,))
        timer.daemon = True
        timer.start()

    def _out_of_time(self, number):
        print(f"grace period of {self.grace_period:g} s over: exiting; the last complete checkpoint is kept",
              flush=True)
        os._exit(128 + number)

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.signal is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank must stop at the same step, or the others wait for ever in the next all-reduce
            flag = torch.tensor([float(stop)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
            self.signal = self.signal or (signal.SIGTERM if stop else None)
        if stop:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed:  # every rank has written its part (its RNG state) before rank 0 commits
            torch.distributed.barrier()
        if state.best_global_step:
            state.best_model_checkpoint = os.path.join(self.output_dir, f"checkpoint-{state.best_global_step}")
        if state.is_world_process_zero:
            config_path = Path(self.output_dir) / RUN_CONFIG
            if not config_path.is_file():
                write_atomically(config_path, json.dumps(self.run_config, indent=1, sort_keys=True))
            step = state.global_step
            final = Path(self.output_dir) / f"checkpoint-{step}"
            commit(Path(staging(self.output_dir)) / f"checkpoint-{step}", final, state.best_global_step)
            best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
            for old in complete_checkpoints(self.output_dir)[: -self.keep]:
                if old != best:
                    shutil.rmtree(old)
        if distributed:  # no rank reads a checkpoint (the best, at the end) before it is in place
            torch.distributed.barrier()

    def on_train_end(self, args, state, control, **kwargs):
        if self.signal is None:  # after a signal the defaults stay: a second one stops at once
            for number, handler in self.previous_handlers.items():
                signal.signal(number, handler)

    def raise_if_stopped(self, state) -> None:
        """After trainer.train(): a signalled run ends here, with a line saying how to resume."""
        if self.signal is None:
            return
        latest = complete_checkpoints(self.output_dir)
        where = latest[-1] if latest else "none"
        raise Stopped(f"stopped by {signal.Signals(self.signal).name} at step {state.global_step}; checkpoint: "
                      f"{where}. Run the same command again to resume.", 128 + self.signal)
