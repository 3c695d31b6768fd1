"""The speed-up study: run configurations one per subprocess, and gather their results into tables, plots and advice.

A single run of the speed-ups script writes `result.json` in its output directory. A sweep runs each configuration
as a subprocess of that script (an out-of-memory error or a crash is recorded as `oom` or `error` with its line, and
the sweep goes on), shows each one's progress, forwards SIGTERM/SIGINT to the running child (which checkpoints and
stops as a single run does), and merges its own directory; `--merge_results` merges directories written by
separate jobs the same way.
"""

import csv
import dataclasses
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import secrets, tracking
from .files import write_atomically
from .errors import Stopped, UsageError, child_failure

AXES = ["batch_size", "num_workers", "pin_memory", "packing", "gradient_checkpointing"]
METRICS = ["tokens_per_second", "samples_per_second", "model_tflops", "mfu", "peak_memory_gib", "measured_steps",
           "step_time_spread"]
COLUMNS = ["name", *AXES, "status", "error", *METRICS]
RESULT = "result.json"
RESULTS = "results.json"  # the table of every configuration
FINISHED = ("ok", "oom", "error")  # a configuration measured (or failed for good); "stopped" is measured again
AUTO_MAX_BATCH = 1024
AUTO_MIN_GAIN = 1.03  # doubling the batch must buy 3% more tokens/s to keep going


def _parse_list(name: str, text: str, parse, what: str) -> list:
    values = []
    for part in (part.strip() for part in text.split(",") if part.strip()):
        try:
            values.append(parse(part))
        except ValueError:
            raise UsageError(f"--{name} {text!r}: {part!r} is not {what}; give a comma-separated list") from None
    repeated = sorted({str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise UsageError(f"--{name} {text!r} lists {', '.join(repeated)} more than once; list each value once")
    return values


def _whole_number(text: str, minimum: int = 0) -> int:
    if not text.isdigit() or not minimum <= int(text) <= AUTO_MAX_BATCH:
        raise ValueError(text)
    return int(text)


def _boolean(text: str) -> bool:
    choices = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in choices:
        raise ValueError(text)
    return choices[text.lower()]


@dataclass
class SweepArguments:
    _argument_group_name = "sweep (Part 4: the study)"

    sweep_batch_sizes: str = field(default="", metadata={
        "help": f"Comma-separated batch sizes (up to {AUTO_MAX_BATCH}), or `auto` (double from 1 until OOM or no "
                f"gain)."})
    sweep_num_workers: str = field(default="", metadata={"help": "Comma-separated worker counts."})
    sweep_pin_memory: str = field(default="", metadata={"help": "e.g. `true,false`."})
    sweep_packing: str = field(default="", metadata={"help": "e.g. `false,true`."})
    sweep_gradient_checkpointing: str = field(default="", metadata={"help": "e.g. `false,true`."})
    sweep_index: int = field(default=-1, metadata={
        "help": "Run only configuration N of a listed sweep, then merge the results present (a Kubernetes "
                "Indexed Job passes its completion index; see k8s/)."})
    merge_results: list[str] = field(default_factory=list, metadata={
        "help": "Merge the result.json files in these directories (and one level below) into --output_dir."})

    def __post_init__(self):
        self.auto = self.sweep_batch_sizes.strip() == "auto"
        self.batch_sizes = [] if self.auto else _parse_list(
            "sweep_batch_sizes", self.sweep_batch_sizes, lambda text: _whole_number(text, minimum=1),
            f"a positive integer up to {AUTO_MAX_BATCH} (or use `auto`)")
        self.worker_counts = _parse_list("sweep_num_workers", self.sweep_num_workers, _whole_number,
                                         f"a whole number up to {AUTO_MAX_BATCH}")
        self.pin_memory_choices = _parse_list("sweep_pin_memory", self.sweep_pin_memory, _boolean, "true or false")
        self.packing_choices = _parse_list("sweep_packing", self.sweep_packing, _boolean, "true or false")
        self.checkpointing_choices = _parse_list("sweep_gradient_checkpointing", self.sweep_gradient_checkpointing,
                                                 _boolean, "true or false")
        if self.sweep_index < -1:
            raise UsageError(f"--sweep_index must be 0 or more (or -1 for the whole sweep), got {self.sweep_index}")
        if self.merge_results and (self.configurations_listed or self.sweep_index >= 0):
            raise UsageError("--merge_results merges results already measured and runs nothing; leave out the "
                             "--sweep_* settings, or run the sweep first")
        if self.auto and self.sweep_index >= 0:
            raise UsageError("--sweep_batch_sizes auto runs sequentially; list the batch sizes to use --sweep_index")

    @property
    def configurations_listed(self) -> bool:
        return bool(self.auto or self.batch_sizes or self.worker_counts or self.pin_memory_choices
                    or self.packing_choices or self.checkpointing_choices)

    @property
    def requested(self) -> bool:
        return bool(self.merge_results) or self.configurations_listed


def config_name(config: dict) -> str:
    return "bs{batch_size}-w{num_workers}-pin{pin_memory:d}-pack{packing:d}-ckpt{gradient_checkpointing:d}".format(
        **config)


def read_result(path: Path, if_damaged: str) -> dict | None:
    """A configuration's result.json, or None: absent, or damaged (one warning line, ending with `if_damaged`)."""
    if not path.is_file() or path.is_symlink():
        return None
    try:
        row = json.loads(path.read_text())
        if isinstance(row, dict) and set(COLUMNS) <= row.keys():
            return row
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    print(f"warning: {path} is not a result this sweep wrote; {if_damaged}", flush=True)
    return None


def write_result(directory: str, config: dict, status: str, metrics: dict | None = None, error: str = "") -> dict:
    row = {"name": config_name(config), **config, "status": status, "error": error,
           **{key: (metrics or {}).get(key) for key in METRICS}}
    Path(directory).mkdir(parents=True, exist_ok=True)
    write_atomically(Path(directory) / RESULT, json.dumps(row, indent=1))
    return row


def record_run(directory: str, args, speed, summary: dict, warmup_steps: int) -> dict:
    """A single run's result.json: its configuration and the TFLOPS callback's summary."""
    config = dict(batch_size=args.batch_size, num_workers=speed.num_workers, pin_memory=speed.pin_memory,
                  packing=args.packing, gradient_checkpointing=args.gradient_checkpointing)
    if "tokens_per_second" not in summary:  # every step was a warm-up step
        return write_result(directory, config, "error", error=f"no step measured after the {warmup_steps} warm-up "
                                                              f"steps; raise --max_train_steps")
    return write_result(directory, config, "ok", summary)


def _as_flags(*dataclass_values) -> list[str]:
    flags = []
    for value in dataclass_values:
        for item in dataclasses.fields(value):
            setting = getattr(value, item.name)
            # secrets travel in the environment, not on a command line; None means the child's own default
            if setting is None or secrets.SECRET_NAME.search(item.name):
                continue
            flags += [f"--{item.name}", str(setting)]
    return flags


def run_configuration(script: str, args, speed, config: dict, sweep_dir: str, label: str) -> dict:
    """Train one configuration in a fresh process (an OOM or crash is contained, no memory carries over), echoing its
    log lines; a SIGTERM/SIGINT to this process is passed on to it."""
    directory = os.path.join(sweep_dir, config_name(config))
    measured = read_result(Path(directory) / RESULT, "measuring its configuration again")
    if measured and measured["status"] in FINISHED and not args.overwrite_output_dir:
        print(f"[sweep {label}] {config_name(config)}: measured already ({measured['status']}); "
              f"--overwrite_output_dir measures it again", flush=True)
        return measured
    checkpointing = config["gradient_checkpointing"]
    child_args = dataclasses.replace(args, output_dir=directory, batch_size=config["batch_size"],
                                     # with it, the layers given (lean: fit), and what they offload
                                     gradient_checkpointing=checkpointing,
                                     checkpointed_layers=args.checkpointed_layers if checkpointing else "all",
                                     offloaded_layers=args.offloaded_layers if checkpointing else 0,
                                     offload_layer_inputs=args.offload_layer_inputs and checkpointing,
                                     packing=config["packing"],  # with it, its attention
                                     packed_attention=args.packed_attention if config["packing"] else "per_example",
                                     recipe=None, overwrite_output_dir=True,  # measure anew
                                     eval_steps=args.max_train_steps)  # one evaluation, at the end
    child_speed = dataclasses.replace(speed, num_workers=config["num_workers"], pin_memory=config["pin_memory"])
    print(f"[sweep {label}] {config_name(config)}", flush=True)
    env = dict(os.environ, **({"HF_TOKEN": args.hf_token} if args.hf_token else {}))
    with tempfile.TemporaryFile("w+") as stderr:
        # Its own session: a terminal's Ctrl-C reaches only this process, which passes it on once.
        child = subprocess.Popen([sys.executable, script, *_as_flags(child_args, child_speed)], env=env,
                                 stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True)
        received = []  # a stop at any moment stops the sweep, whatever the child makes of it (still loading, say)

        def forward(number, frame):
            received.append(number)
            child.send_signal(number)

        previous = {number: signal.signal(number, forward) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            for line in child.stdout:
                if line.startswith(("step ", "warning:")):
                    print(f"[sweep {label}] {line.rstrip()}", flush=True)
            child.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        stderr.seek(0)
        errors = stderr.read()
    if child.returncode == 0 and os.path.exists(os.path.join(directory, RESULT)):
        row = json.load(open(os.path.join(directory, RESULT)))
        from .console import stability_warning  # here, not at the top: --help needs no transformers

        warning = stability_warning(row["name"], row) if row["status"] == "ok" else None
        if warning:
            print(f"[sweep {label}] {warning}", flush=True)
        return row
    if received or child.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        number = received[-1] if received else child.returncode - 128
        write_result(directory, config, "stopped", error=f"stopped by signal {number}")
        raise Stopped(f"sweep stopped during {config_name(config)} (recorded as stopped); rerun the command to "
                      f"measure the configurations not yet done (those measured stay as they are)", 128 + number)
    status, message = child_failure(errors)
    return write_result(directory, config, status, error=message)


def configurations(args, speed, sweeping: SweepArguments, batch_sizes: list[int] | None = None) -> list[dict]:
    """Every configuration of a sweep, in a fixed order (an Indexed Job's index picks one)."""
    return [dict(batch_size=batch, num_workers=workers, pin_memory=pin, packing=packing,
                 gradient_checkpointing=checkpointing)
            for workers, pin, packing, checkpointing in itertools.product(
                sweeping.worker_counts or [speed.num_workers], sweeping.pin_memory_choices or [speed.pin_memory],
                sweeping.packing_choices or [args.packing],
                sweeping.checkpointing_choices or [args.gradient_checkpointing])
            for batch in (batch_sizes or sweeping.batch_sizes or [args.batch_size])]


def run(script: str, args, speed, sweeping: SweepArguments) -> list[dict]:
    """Run the sweep's configurations (batch sizes listed, or `auto`: doubled from 1 until out of memory or until
    throughput stops improving; with `sweep_index`, only that one), then merge whatever results the output
    directory holds into tables, plots and a recommendation."""
    if not sweeping.auto:
        todo = configurations(args, speed, sweeping)
        if sweeping.sweep_index >= 0:
            if sweeping.sweep_index >= len(todo):
                raise UsageError(f"--sweep_index {sweeping.sweep_index} is out of range: the sweep has {len(todo)} "
                                 f"configurations")
            todo = [todo[sweeping.sweep_index]]
        for number, config in enumerate(todo, 1):
            run_configuration(script, args, speed, config, args.output_dir, f"{number}/{len(todo)}")
    else:
        for number, base in enumerate(configurations(args, speed, sweeping, batch_sizes=[1]), 1):
            previous = 0.0
            while base["batch_size"] <= AUTO_MAX_BATCH:
                row = run_configuration(script, args, speed, base, args.output_dir, f"auto {number}")
                if row["status"] != "ok" or row["tokens_per_second"] < previous * AUTO_MIN_GAIN:
                    break
                base, previous = dict(base, batch_size=base["batch_size"] * 2), row["tokens_per_second"]
    return merge(collect([args.output_dir]), args.output_dir, speed.memory_budget_gib)


def main(script: str, args, speed, sweeping: SweepArguments) -> list[dict]:
    """The study: merge separate jobs' results, or run the sweep (each child its own W&B run in the sweep's group,
    plus a summary run with the table and plots)."""
    if sweeping.merge_results:
        missing = [d for d in sweeping.merge_results if not Path(d).is_dir()]
        if missing:
            raise UsageError(f"--merge_results: {', '.join(missing)} is not a directory")
        rows = collect(sweeping.merge_results)
        if not rows:
            raise UsageError(f"--merge_results: no {RESULT} in {', '.join(sweeping.merge_results)} or one level "
                             f"below; point it at the sweep jobs' output directories")
        return merge(rows, args.output_dir, speed.memory_budget_gib)
    check_inputs(args)
    tracking.choose_mode(args)  # the children inherit these settings
    tracking.configure(args)
    os.environ.setdefault("WANDB_RUN_GROUP", os.path.basename(os.path.abspath(args.output_dir)))
    os.environ["WANDB_JOB_TYPE"] = "sweep"
    rows = run(script, args, speed, sweeping)
    if args.report_to == "wandb":
        log_summary_to_wandb(rows, args.output_dir)
    return rows


def check_inputs(args) -> None:
    """What every configuration would refuse, refused once before the first starts: the output directory, the model
    and the data; and steps by epochs (configurations with other batch sizes would train different numbers of
    steps, and their figures would not compare), or too few steps to measure any."""
    from flops_counter import WARMUP_STEPS

    from . import checkpointing, data, modeling

    if args.num_train_epochs is not None:
        raise UsageError("a sweep compares configurations at the same number of steps: give --max_train_steps, not "
                         "--num_train_epochs")
    if args.max_train_steps <= WARMUP_STEPS:
        raise UsageError(f"a sweep measures the steps after the first {WARMUP_STEPS} (warm-up) and --max_train_steps "
                         f"{args.max_train_steps} leaves none; give --max_train_steps {WARMUP_STEPS + 5} or more "
                         f"(5 measured)")
    checkpointing.check_output_dir(args.output_dir, ours=lambda path: (path / RESULTS).is_file()
                                   or any(path.glob(f"*/{RESULT}")))
    modeling.check_model(args.model, args.seq_length, args.hf_token or None)
    data.load_examples(args.dataset, args.prompt_column, args.completion_column, args.hf_token or None,
                       modeling.load_tokenizer(args.model, args.hf_token or None), args.dataset_split)


def collect(directories: list[str]) -> list[dict]:
    """Every result.json in the given directories or one level below them, in a stable order."""
    rows = {}
    for directory in directories:
        for path in [Path(directory) / RESULT, *sorted(Path(directory).glob(f"*/{RESULT}"))]:
            row = read_result(path, "leaving it out of the table")
            if row is not None:
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
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=7)
        path = os.path.join(out_dir, f"{metric}_vs_batch_size.png")
        figure.tight_layout()
        image = io.BytesIO()
        figure.savefig(image, format="png", dpi=100)
        plt.close(figure)
        temporary = f"{path}.{os.getpid()}.tmp"  # jobs merging at once each write whole files
        Path(temporary).write_bytes(image.getvalue())
        os.replace(temporary, path)
        paths.append(path)
    return paths


def merge(rows: list[dict], out_dir: str, memory_budget_gib: float = 0.0) -> list[dict]:
    """Write results.csv, results.json and the plots for the results (`collect`'s); print the table and the
    recommendation."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_atomically(Path(out_dir) / RESULTS, json.dumps(rows, indent=1))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(Path(out_dir) / "results.csv", table.getvalue())
    plots = plot(rows, out_dir)
    print(f"{'configuration':34s} {'status':7s} {'tokens/s':>9s} {'samples/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'GiB':>6s}")
    for row in rows:
        cells = ["" if row[key] is None else f"{row[key]:.3g}" for key in METRICS[:5]]
        print(f"{row['name']:34s} {row['status']:7s} {cells[0]:>9s} {cells[1]:>9s} {cells[2]:>8s} {cells[3]:>6s} "
              f"{cells[4]:>6s} {row['error'][:60]}")
    for line in recommend(rows, memory_budget_gib):
        print(line)
    print(f"results: {os.path.join(out_dir, 'results.csv')}, plots: {', '.join(plots)}")
    return rows


def log_summary_to_wandb(rows: list[dict], out_dir: str) -> None:
    """One summary run in the sweep's W&B group (the configurations' own runs are already there): the results
    table and the plots."""
    import wandb  # only when W&B is in use

    run = wandb.init(name="summary", job_type="sweep", tags=["summary"], group=os.environ.get("WANDB_RUN_GROUP"))
    table = wandb.Table(columns=COLUMNS, data=[[row[column] for column in COLUMNS] for row in rows])
    plots = sorted(Path(out_dir).glob("*_vs_batch_size.png"))
    images = {f"plots/{path.stem}": wandb.Image(str(path)) for path in plots}
    run.log({"results": table, **images})
    print(tracking.end_run(), flush=True)
