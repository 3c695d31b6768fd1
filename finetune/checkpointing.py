"""Preemption-safe runs: checkpoints committed atomically, resumed automatically, and a clean stop on SIGTERM/SIGINT.

The Trainer writes each checkpoint into `<output_dir>/.staging/`; `CheckpointCallback.on_save` then writes a
completion marker, fsyncs every file, and renames the directory into `<output_dir>/checkpoint-N`. A rename within
one file system is atomic, so a run killed at any moment leaves either the new checkpoint complete or none of it;
only directories with the marker are ever resumed from, and the staging area is cleared at the next start.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from .cli import Stopped, UsageError

MARKER = "checkpoint.complete"
STAGING = ".staging"
RUN_CONFIG = "run_config.json"
# Arguments that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = {"output_dir", "report_to", "wandb_project", "max_train_steps", "logging_steps", "eval_steps",
                     "resume", "overwrite_output_dir", "grace_period_seconds", "hf_token", "recipe"}


def staging(output_dir: str) -> str:
    return os.path.join(output_dir, STAGING)


def _step(path: Path) -> int:
    return int(re.search(r"checkpoint-(\d+)$", path.name).group(1))


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Committed checkpoints, oldest first. A directory without the marker is never among them."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if (p / MARKER).is_file()]
    return sorted(found, key=_step)


def _comparable(args) -> dict:
    return {key: value for key, value in dataclasses.asdict(args).items() if key not in RESUMABLE_CHANGES}


def check_output_dir(output_dir: str) -> None:
    """An output directory that is a file, or cannot be created or written, stops the run before anything else."""
    path = Path(output_dir).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {output_dir!r} is a file; give a directory")
    ancestor = next(p for p in [path, *path.parents] if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"--output_dir {output_dir!r} cannot be written ({ancestor} is not a writable directory)")


def resume_point(args) -> str | None:
    """The checkpoint to resume from (`--resume auto`), or None to start fresh. Refuses an output directory that
    holds a run of another configuration, unless --overwrite_output_dir; nothing is deleted without that flag."""
    check_output_dir(args.output_dir)
    checkpoints = complete_checkpoints(args.output_dir)
    config_path = Path(args.output_dir) / RUN_CONFIG
    if args.overwrite_output_dir:
        return None
    if config_path.is_file():
        saved = json.loads(config_path.read_text())
        changed = {key: (saved.get(key), value) for key, value in _comparable(args).items() if saved.get(key) != value}
        if changed:
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
            raise UsageError(f"{args.output_dir!r} holds a run with another configuration ({details}); use another "
                             f"--output_dir, or --overwrite_output_dir to start over")
    if checkpoints and args.resume == "never":
        raise UsageError(f"{args.output_dir!r} holds checkpoints and --resume is never; use --resume auto, another "
                         f"--output_dir, or --overwrite_output_dir")
    return str(checkpoints[-1]) if checkpoints else None


def start(args) -> None:
    """Once the input is valid: clear what an overwrite or an interrupted save left, and record the configuration."""
    out = Path(args.output_dir)
    if args.overwrite_output_dir:
        for old in out.glob("checkpoint-*"):
            shutil.rmtree(old)
    shutil.rmtree(out / STAGING, ignore_errors=True)  # partial checkpoints of a killed run: never loaded
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_CONFIG).write_text(json.dumps(_comparable(args), indent=1, sort_keys=True))


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def commit(staged: Path, final: Path, best_step: int | None) -> None:
    """Mark, fsync and rename a staged checkpoint into place."""
    state_file = staged / "trainer_state.json"
    if state_file.is_file() and best_step:  # point the saved state at the best checkpoint's final place
        state = json.loads(state_file.read_text())
        state["best_model_checkpoint"] = str(final.parent / f"checkpoint-{best_step}")
        state_file.write_text(json.dumps(state, indent=2))
    (staged / MARKER).write_text(str(_step(final)))
    for file in staged.rglob("*"):
        if file.is_file():
            _fsync(file)
    _fsync(staged)
    if final.exists():  # the same step saved twice (a stop right after a scheduled save)
        shutil.rmtree(final)
    os.rename(staged, final)
    _fsync(final.parent)


class CheckpointCallback(TrainerCallback):
    """Commits checkpoints atomically, keeps the newest `keep` plus the best, and turns SIGTERM/SIGINT into a stop
    after the step in flight with a checkpoint; past `grace_period` seconds the process exits regardless (the
    last committed checkpoint is intact)."""

    def __init__(self, output_dir: str, keep: int = 2, grace_period: float = 25.0):
        self.output_dir, self.keep, self.grace_period = output_dir, keep, grace_period
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
