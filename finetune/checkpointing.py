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
import threading
from pathlib import Path

import torch
from transformers import TrainerCallback

from .errors import Finished, Stopped, UsageError, first_line
from . import files
from .tracking import ID_FILE
from .files import fsync, write_atomically

MARKER = "checkpoint.complete"
STAGING = ".staging"
RUN_CONFIG = "run_config.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
# The adapter's files, verified when a finished run is rerun (and rebuilt from its best checkpoint if damaged).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Arguments that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = {"output_dir", "report_to", "wandb_project", "max_train_steps", "num_train_epochs",
                     "logging_steps", "eval_steps", "resume", "overwrite_output_dir", "grace_period_seconds",
                     "hf_token", "recipe", "humaneval", "humaneval_infilling", "humaneval_limit", "check_memory",
                     "push_to_hub", "hub_model_id", "hub_private", "fuse_lora", "compile_layers",
                     "checkpointed_layers", "offloaded_layers", "offload_layer_inputs"}
_held_locks: dict[str, int] = {}  # this process's locks, by output directory: open descriptors


def holds_run(directory: Path) -> bool:
    """A training run's directory (its recorded configuration or its manifest), or one of its checkpoints."""
    return any((Path(directory) / name).is_file() for name in (RUN_CONFIG, MANIFEST, MARKER))


def staging(output_dir: str) -> str:
    return os.path.join(output_dir, STAGING)


def step_of(path) -> int:
    """The step a checkpoint directory (checkpoint-<step>) was written at."""
    return int(CHECKPOINT.fullmatch(Path(path).name).group(1))


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Committed checkpoints, oldest first: directories named checkpoint-<step> that hold the marker, never a link or
    anything else a user left beside them."""
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if CHECKPOINT.fullmatch(p.name) and p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()]
    return sorted(found, key=step_of)


def digest(path: Path) -> list:
    """[size, SHA-256] of a file."""
    with open(path, "rb") as f:
        return [path.stat().st_size, hashlib.file_digest(f, "sha256").hexdigest()]


def _files(directory: Path) -> dict[str, list]:
    """Every file under `directory` but the marker: relative path -> [size, SHA-256]."""
    return {str(path.relative_to(directory)): digest(path) for path in sorted(directory.rglob("*"))
            if path.is_file() and not path.is_symlink() and path.name != MARKER}


def _recorded_files(marker: Path):
    """The files a completion marker records, or why they cannot be read from it."""
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        return f"its completion marker is unreadable ({first_line(error)})"
    if not (isinstance(recorded, dict) and all(isinstance(v, list) and len(v) == 2 for v in recorded.values())):
        return "its completion marker does not list files as [size, SHA-256]"
    return recorded


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a committed checkpoint (a file missing, truncated or changed, a link inside), or None if it
    verifies."""
    links = [p.name for p in checkpoint.rglob("*") if p.is_symlink()]
    if links:
        return f"it holds a symbolic link ({links[0]}), which no checkpoint writes"
    expected = _recorded_files(checkpoint / MARKER)
    if isinstance(expected, str):
        return expected
    found = _files(checkpoint)
    for name, (size, sha) in expected.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != [size, sha]:
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


# What a directory holds that is not the user's, before a run's first checkpoint records the run there: the lock,
# the staging area, W&B's id and folder, a sweep configuration's result.json; and a volume's lost+found.
NOT_THE_USERS = {LOCK, STAGING, ID_FILE, "wandb", "result.json", "lost+found"}  # result.json: sweep.RESULT


def check_output_dir(output_dir: str, ours=holds_run) -> None:
    """An output directory that is a file, a link, inside another run's directory or checkpoint, that cannot be
    created or written, or that holds the user's files and nothing of this toolkit's (`ours`: a run; for a sweep, its
    results), stops the run before anything else: a model card, an adapter and checkpoints written among the user's
    files (into `.`, a home directory or `/`) would mix with them, or replace one of the same name."""
    path = Path(output_dir).absolute()
    if path.is_symlink():
        raise UsageError(f"--output_dir {output_dir!r} is a symbolic link; give the directory it points to")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {output_dir!r} is a file; give a directory")
    if (path / MARKER).exists():
        raise UsageError(f"--output_dir {output_dir!r} is a checkpoint of a run; give a directory of its own")
    run = next((p for p in path.resolve().parents if holds_run(p)), None)
    if run is not None:
        raise UsageError(f"--output_dir {output_dir!r} is inside the run directory {str(run)!r}; give a directory "
                         f"outside it")
    why = files.writable(path)
    if why:
        raise UsageError(f"--output_dir {output_dir!r} cannot be written ({why})")
    theirs = sorted(p.name for p in path.iterdir() if p.name not in NOT_THE_USERS) if path.is_dir() else []
    if theirs and not ours(path):
        raise UsageError(f"--output_dir {output_dir!r} holds other files ({', '.join(theirs[:3])}"
                         f"{', ...' if len(theirs) > 3 else ''}) and no run to resume; give a new or empty directory")


def read_manifest(output_dir: str, warn: bool = True) -> dict | None:
    """A finished run's manifest.json, or None (no manifest, or a damaged one: the run counts as unfinished and
    resumes from its verified checkpoints, rewriting the manifest when it finishes; one warning line with `warn`)."""
    path = Path(output_dir) / MANIFEST
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        manifest = files.read_json(path, "the finished run's manifest", "")
        step = manifest["metrics"]["global_step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise TypeError(f"its global_step is {step!r}")
        return manifest
    except (UsageError, KeyError, TypeError) as error:
        if warn:
                print(f"warning: {path} is damaged ({first_line(error)[:100]}); treating the run as unfinished: it "
                  f"resumes from its newest intact checkpoint", flush=True)
        return None


def _final_adapter_damage(output_dir: Path, manifest: dict) -> str | None:
    recorded = manifest.get("outputs", {})
    for name in ADAPTER_FILES:
        path = output_dir / name
        if name not in recorded:
            continue
        if path.is_symlink() or not path.is_file():
            return f"{name} is missing"
        if digest(path) != recorded[name]:
            return f"{name} does not match its recorded size and hash"
    return None


def _rebuild_final_adapter(output_dir: Path, manifest: dict, problem: str) -> None:
    """Copy the final adapter back from the checkpoint it came from (the best, recorded in the manifest), if that
    checkpoint verifies and its files are the ones recorded; else refuse."""
    best = output_dir / str(manifest.get("best_checkpoint") or "")
    found = CHECKPOINT.fullmatch(best.name) and best.is_dir() and damage(best) is None
    if found and all(digest(best / name) == manifest["outputs"].get(name) for name in ADAPTER_FILES
                     if (best / name).is_file()):
        for name in ADAPTER_FILES:
            temporary = output_dir / f".{name}.tmp"
            shutil.copyfile(best / name, temporary)
            fsync(temporary)
            os.replace(temporary, output_dir / name)
        print(f"warning: the final adapter was damaged ({problem}); rebuilt it from {best.name}, which verifies",
              flush=True)
        return
    raise UsageError(f"the final adapter in {str(output_dir)!r} is damaged ({problem}) and no intact checkpoint holds "
                     f"it; use --overwrite_output_dir to train again")


def _check(args, config: dict, repair: bool) -> int:
    """Refuse a directory that holds a run of another configuration; stop (Finished) if it holds this run, done, its
    final adapter verified (rebuilt when damaged, under the lock: `repair`). Returns the step a finished run ended at
    when --max_train_steps has been raised past it (it trains on), else 0."""
    out = Path(args.output_dir)
    if args.overwrite_output_dir or not ((out / RUN_CONFIG).exists() or (out / RUN_CONFIG).is_symlink()):
        return 0
    saved = files.read_json(out / RUN_CONFIG, "the configuration this directory trains",
                            "restore it, or use --overwrite_output_dir to start over")
    changed = {key: (saved.get(key), value) for key, value in config.items() if saved.get(key) != value}
    if changed:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
        raise UsageError(f"{args.output_dir!r} holds a run with another configuration ({details}); use another "
                         f"--output_dir, or --overwrite_output_dir to start over")
    manifest = read_manifest(args.output_dir, warn=repair)
    if manifest is None:
        return 0
    step = manifest["metrics"]["global_step"]
    if step < args.max_train_steps:
        return step
    problem = _final_adapter_damage(out, manifest)
    if problem and not repair:
        return 0  # rebuilt under the lock, on the second look
    if problem:
        _rebuild_final_adapter(out, manifest, problem)
    raise Finished(f"already finished: {step} steps with this configuration; the adapter is in {args.output_dir}. "
                   f"Raise --max_train_steps to train on, or use --overwrite_output_dir to start over.")


def claim(args, config: dict) -> tuple[str | None, int]:
    """Check the output directory against this run's configuration and, on the first process, lock it for this
    run's lifetime. Returns the checkpoint to resume from (the newest intact one, or None) and the step a finished
    run ended at when it trains on (else 0). Read-only until the lock; checked again under it, since the process
    that held it may have changed the directory."""
    check_output_dir(args.output_dir)
    _check(args, config, repair=False)
    if int(os.environ.get("RANK", 0)) == 0:
        _lock(args.output_dir)
    finished_at = _check(args, config, repair=True)
    latest = None if args.overwrite_output_dir else newest_intact(args.output_dir)
    if latest and args.resume == "never":
        raise UsageError(f"{args.output_dir!r} holds checkpoints and --resume is never; use --resume auto, another "
                         f"--output_dir, or --overwrite_output_dir")
    return (str(latest) if latest else None), finished_at


def _lock(output_dir: str) -> None:
    """An exclusive lock (flock: released by the kernel when its holder dies, SIGKILL included) on output_dir/.lock,
    which names its holder for the run it turns away."""
    key = os.path.abspath(output_dir)
    if key in _held_locks:  # this process holds it already (a test or notebook running twice)
        return
    os.makedirs(output_dir, exist_ok=True)
    path = Path(output_dir) / LOCK
    files.refuse_link(path, "the toolkit's lock file")
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:  # a directory, or something else a user left in its place
        raise UsageError(f"{path} cannot be the toolkit's lock file ({first_line(error)}): remove it") from None
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


def previous_run_files(output_dir: str) -> list[Path]:
    """What an earlier run wrote here, and only that: its checkpoints (which hold the marker), its recorded
    configuration, its W&B id, the files its manifest lists and the manifest. A user's own files stay, whatever
    their names; so does W&B's folder (an offline run there may not be uploaded yet)."""
    out = Path(output_dir)
    manifest = read_manifest(output_dir, warn=False) or {}
    named = [out / name for name in manifest.get("outputs", {}) if "/" not in name and not name.startswith(".")]
    named += [out / name for name in (RUN_CONFIG, ID_FILE) if (out / RUN_CONFIG).is_file()]
    named += [out / MANIFEST] if manifest else []
    return [*complete_checkpoints(output_dir), *dict.fromkeys(p for p in named if p.is_file() and not p.is_symlink())]


def top_level_files(output_dir: str) -> dict[str, tuple[int, int]]:
    """The regular files at the top of the output directory, by name: (modification time, size)."""
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(output_dir).iterdir()
            if p.is_file() and not p.is_symlink() and not p.name.startswith(".")}


def start(args) -> dict[str, tuple[int, int]]:
    """On the first process, once the input is valid and the directory locked: with --overwrite_output_dir remove
    what the previous run wrote (so nothing of it is mistaken for this run's), and clear what an interrupted save
    left in the staging area. Returns the top-level files there now, so the run can tell the ones it writes."""
    out = Path(args.output_dir)
    if args.overwrite_output_dir:
        for old in previous_run_files(args.output_dir):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    shutil.rmtree(out / STAGING, ignore_errors=True)  # partial checkpoints of a killed run: never loaded
    out.mkdir(parents=True, exist_ok=True)
    return top_level_files(args.output_dir)


def written_since(output_dir: str, before: dict) -> dict[str, list]:
    """The top-level files written since `before` (start's snapshot), with their size and SHA-256: what the
    manifest records as this run's outputs."""
    return {name: digest(Path(output_dir) / name) for name, stamp in top_level_files(output_dir).items()
            if before.get(name) != stamp}


def commit(staged: Path, final: Path, best_step: int | None) -> None:
    """Mark (every file's size and hash), fsync and rename a staged checkpoint into place."""
    state_file = staged / "trainer_state.json"
    if state_file.is_file() and best_step:  # point the saved state at the best checkpoint's final place
        state = json.loads(state_file.read_text())
        state["best_model_checkpoint"] = str(final.parent / f"checkpoint-{best_step}")
        state_file.write_text(json.dumps(state, indent=2))
    (staged / MARKER).write_text(json.dumps({"step": step_of(final), "files": _files(staged)}, indent=1))
    files.share(staged)  # safetensors writes 0600: a serving pod with another uid reads the best checkpoint too
    for file in staged.rglob("*"):
        if file.is_file():
            fsync(file)
    fsync(staged)
    if final.exists():  # the same step saved twice (a stop right after a scheduled save), or a damaged one
        shutil.rmtree(final)
    os.rename(staged, final)
    fsync(final.parent)


def any_rank(flag: bool, device) -> bool:
    """Whether `flag` holds on any process: every rank must stop at the same step, or the others wait for ever in the
    next all-reduce."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


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
        stop = any_rank(self.signal is not None, args.device)
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
