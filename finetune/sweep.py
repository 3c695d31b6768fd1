"""The speed-up study: run configurations one per subprocess, and gather their results into tables, plots and advice.

A single run writes `result.json` in its output directory. A sweep runs each configuration as a subprocess of the
speed-ups script, writing a failure (`oom` or `error` with its first line) where the child could not, and then
merges its own directory; `--merge_results` merges directories written by separate jobs the same way.
"""

import csv
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from . import secrets, training
from .cli import UsageError

AXES = ["batch_size", "num_workers", "pin_memory", "packing", "gradient_checkpointing"]
METRICS = ["tokens_per_second", "samples_per_second", "model_tflops", "mfu", "peak_memory_gib"]
COLUMNS = ["name", *AXES, "status", "error", *METRICS]
RESULT = "result.json"
AUTO_MAX_BATCH = 1024
AUTO_MIN_GAIN = 1.03  # doubling the batch must buy 3% more tokens/s to keep going


def config_name(config: dict) -> str:
    return "bs{batch_size}-w{num_workers}-pin{pin_memory:d}-pack{packing:d}-ckpt{gradient_checkpointing:d}".format(
        **config)


def write_result(directory: str, config: dict, status: str, metrics: dict | None = None, error: str = "") -> dict:
    row = {"name": config_name(config), **config, "status": status, "error": error,
           **{key: (metrics or {}).get(key) for key in METRICS}}
    Path(directory).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(directory, RESULT), "w") as f:
        json.dump(row, f, indent=1)
    return row


def _first_error_line(stderr: str) -> str:
    """The exception's message from a child's stderr: our `error: ...` line, or the traceback's last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: ") or re.match(r"^[\w.]+(Error|Exception)\b", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _as_flags(*dataclass_values) -> list[str]:
    flags = []
    for value in dataclass_values:
        for item in dataclasses.fields(value):
            setting = getattr(value, item.name)
            if item.name.startswith("sweep_") or item.name == "merge_results":  # the child runs one configuration
                continue
            if secrets.SECRET_NAME.search(item.name):  # passed in the environment, not on a command line
                continue
            flags += [f"--{item.name}", str(setting)]
    return flags


def run_configuration(script: str, args, speed, config: dict, sweep_dir: str) -> dict:
    """Train one configuration in a fresh process, so an OOM or crash is contained and no memory carries over."""
    directory = os.path.join(sweep_dir, config_name(config))
    child_args = dataclasses.replace(args, output_dir=directory, batch_size=config["batch_size"],
                                     gradient_checkpointing=config["gradient_checkpointing"],
                                     packing=config["packing"], recipe="", overwrite_output_dir=True,  # measure anew
                                     eval_steps=args.max_train_steps)  # one evaluation, at the end
    child_speed = dataclasses.replace(speed, num_workers=config["num_workers"], pin_memory=config["pin_memory"])
    command = [sys.executable, script, *_as_flags(child_args, child_speed)]
    print(f"[sweep] {config_name(config)}", flush=True)
    env = dict(os.environ, **({"HF_TOKEN": args.hf_token} if args.hf_token else {}))
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if done.returncode == 0 and os.path.exists(os.path.join(directory, RESULT)):
        return json.load(open(os.path.join(directory, RESULT)))
    message = _first_error_line(done.stderr)
    out_of_memory = re.search(r"out of memory|OutOfMemoryError", done.stderr, re.IGNORECASE)
    return write_result(directory, config, "oom" if out_of_memory else "error", error=message)


def _values(text: str, default, parse=int) -> list:
    return [parse(part.strip()) for part in text.split(",") if part.strip()] if text else [default]


def _boolean(text: str) -> bool:
    return text.lower() in {"1", "true", "yes", "on"}


def configurations(args, speed) -> list[dict]:
    """Every configuration of a sweep with listed batch sizes, in a fixed order (an Indexed Job's index picks one)."""
    return [dict(batch_size=batch, num_workers=workers, pin_memory=pin, packing=packing,
                 gradient_checkpointing=checkpointing)
            for workers, pin, packing, checkpointing in itertools.product(
                _values(speed.sweep_num_workers, speed.num_workers),
                _values(speed.sweep_pin_memory, speed.pin_memory, _boolean),
                _values(speed.sweep_packing, args.packing, _boolean),
                _values(speed.sweep_gradient_checkpointing, args.gradient_checkpointing, _boolean))
            for batch in _values(speed.sweep_batch_sizes, args.batch_size)]


def run(script: str, args, speed) -> list[dict]:
    """Run the sweep's configurations (batch sizes listed, or `auto`: doubled from 1 until out of memory or until
    throughput stops improving; with `sweep_index`, only that one), then merge whatever results the output
    directory holds into tables, plots and a recommendation."""
    if speed.sweep_batch_sizes.strip() != "auto":
        todo = configurations(args, speed)
        if speed.sweep_index >= 0:
            if speed.sweep_index >= len(todo):
                raise UsageError(f"--sweep_index {speed.sweep_index} is out of range: the sweep has {len(todo)} "
                                 f"configurations")
            todo = [todo[speed.sweep_index]]
        for config in todo:
            run_configuration(script, args, speed, config, args.output_dir)
    elif speed.sweep_index >= 0:
        raise UsageError("--sweep_batch_sizes auto runs sequentially; list the batch sizes to use --sweep_index")
    else:
        for base in configurations(args, dataclasses.replace(speed, sweep_batch_sizes="1")):
            previous = 0.0
            while base["batch_size"] <= AUTO_MAX_BATCH:
                row = run_configuration(script, args, speed, base, args.output_dir)
                if row["status"] != "ok" or row["tokens_per_second"] < previous * AUTO_MIN_GAIN:
                    break
                base, previous = dict(base, batch_size=base["batch_size"] * 2), row["tokens_per_second"]
    return merge([args.output_dir], args.output_dir, speed.memory_budget_gib)


def collect(directories: list[str]) -> list[dict]:
    """Every result.json in the given directories or one level below them, in a stable order."""
    rows = {}
    for directory in directories:
        for path in [Path(directory) / RESULT, *sorted(Path(directory).glob(f"*/{RESULT}"))]:
            if path.is_file():
                row = json.loads(path.read_text())
                rows[row["name"]] = row
    return sorted(rows.values(), key=lambda row: [row[axis] for axis in AXES[1:]] + [row["batch_size"]])


def recommend(rows: list[dict], memory_budget_gib: float = 0.0) -> list[str]:
    ok = [row for row in rows if row["status"] == "ok"]
    advice = []
    if ok:
        best = max(ok, key=lambda row: row["tokens_per_second"])
        advice.append(f"fastest: {best['name']} at {best['tokens_per_second']:.0f} tokens/s")
    if memory_budget_gib:
        fitting = [row for row in ok if row["peak_memory_gib"] is not None
                   and row["peak_memory_gib"] <= memory_budget_gib]
        if fitting:
            best = max(fitting, key=lambda row: row["tokens_per_second"])
            advice.append(f"fastest within {memory_budget_gib:g} GiB: {best['name']} at "
                          f"{best['tokens_per_second']:.0f} tokens/s, {best['peak_memory_gib']:.1f} GiB peak")
        else:
            advice.append(f"no configuration measured within {memory_budget_gib:g} GiB (peak memory is measured "
                          f"on GPUs only)")
    return advice or ["no configuration finished"]


def plot(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    charts = [("model_tflops", "model TFLOP/s"), ("samples_per_second", "samples/s"),
              ("tokens_per_second", "tokens/s (non-padding)"), ("peak_memory_gib", "peak GPU memory (GiB)")]
    series = {}
    for row in rows:
        label = "w{num_workers} pin={pin_memory} pack={packing} ckpt={gradient_checkpointing}".format(**row)
        series.setdefault(label, []).append(row)
    paths = []
    for metric, title in charts:
        figure, axes = plt.subplots(figsize=(6, 4))
        for label, points in series.items():
            ok = [(p["batch_size"], p[metric]) for p in points if p["status"] == "ok" and p[metric] is not None]
            failed = [p["batch_size"] for p in points if p["status"] != "ok"]
            line = axes.plot(*zip(*ok), marker="o", label=label)[0] if ok else None
            if failed:  # failed points sit on the x axis as crosses
                axes.plot(failed, [0] * len(failed), "x", markersize=10, color=line.get_color() if line else "red",
                          label=f"{label}: failed (oom/error)")
        if any(p["batch_size"] > 0 for p in rows):
            axes.set_xscale("symlog", base=2, linthresh=1)  # symlog: a failed batch size 0 still has a place
        if not any(p[metric] is not None for p in rows):
            axes.text(0.5, 0.5, "not measured (peak memory is read on GPUs only)", ha="center",
                      transform=axes.transAxes)
        axes.set_xlabel("batch size")
        axes.set_ylabel(title)
        axes.set_title(f"{title} vs batch size")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        path = os.path.join(out_dir, f"{metric}_vs_batch_size.png")
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def merge(directories: list[str], out_dir: str, memory_budget_gib: float = 0.0) -> list[dict]:
    """Write results.csv, results.json and the plots for the results found in `directories`; print the table and
    the recommendation."""
    rows = collect(directories)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plots = plot(rows, out_dir)
    print(f"{'configuration':34s} {'status':6s} {'tokens/s':>9s} {'samples/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'GiB':>6s}")
    for row in rows:
        numbers = [row[key] for key in METRICS]
        cells = ["" if value is None else f"{value:.3g}" for value in numbers]
        print(f"{row['name']:34s} {row['status']:6s} {cells[0]:>9s} {cells[1]:>9s} {cells[2]:>8s} {cells[3]:>6s} "
              f"{cells[4]:>6s} {row['error'][:60]}")
    for line in recommend(rows, memory_budget_gib):
        print(line)
    print(f"results: {os.path.join(out_dir, 'results.csv')}, plots: {', '.join(plots)}")
    return rows


def log_summary_to_wandb(rows: list[dict], out_dir: str) -> None:
    """One summary run in the sweep's W&B group (the configurations' own runs are already there): the results
    table and the plots."""
    import wandb  # only when W&B is in use

    run = wandb.init(name="summary", job_type="sweep-summary", group=os.environ.get("WANDB_RUN_GROUP"))
    table = wandb.Table(columns=COLUMNS, data=[[row[column] for column in COLUMNS] for row in rows])
    plots = sorted(Path(out_dir).glob("*_vs_batch_size.png"))
    images = {f"plots/{path.stem}": wandb.Image(str(path)) for path in plots}
    run.log({"results": table, **images})
    training.end_wandb_run()
