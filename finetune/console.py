"""What a person sees while a run trains and when it ends: a progress bar on a terminal (plain lines through a pipe),
one readable line per log step, and a closing summary."""

import sys

from transformers import TrainerCallback
from transformers.utils import logging as transformers_logging

# Trainer log keys shown on a step's line, in order, with how to print them.
_LINE = [("loss", "loss {:.4f}"), ("eval_loss", "eval loss {:.4f}"), ("learning_rate", "lr {:.2e}"),
         ("grad_norm", "grad norm {:.3f}"), ("tokens_per_second", "{:,.0f} tokens/s"),
         ("model_tflops", "{:.3g} TFLOP/s"), ("mfu", "MFU {:.1%}")]


def interactive() -> bool:
    return sys.stderr.isatty()


def quiet_progress_bars() -> None:
    """Progress bars of data preparation and weight loading only on a terminal: through a pipe each redraw is a line."""
    import datasets

    datasets.disable_progress_bars()  # our maps take seconds
    if not interactive():
        transformers_logging.disable_progress_bar()


def log_line(step: int, max_steps: int, logs: dict) -> str | None:
    if not {"loss", "eval_loss"} & logs.keys():  # the Trainer's closing totals repeat what was printed
        return None
    parts = [template.format(logs[key]) for key, template in _LINE if isinstance(logs.get(key), (int, float))]
    return f"step {step}/{max_steps}  " + "  ".join(parts)


class ConsoleCallback(TrainerCallback):
    """Progress and log lines on the first process: a tqdm bar above the lines on a terminal, plain lines (flushed
    as they happen) otherwise."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        line = log_line(state.global_step, state.max_steps, logs or {}) if state.is_world_process_zero else None
        if line is None:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Progress:
    """Progress through a long evaluation (HumanEval): a bar on a terminal, else a line per update, each with the
    score so far."""

    def __init__(self, total: int, label: str, unit: str):
        self.total, self.label, self.unit, self.done = total, label, unit, 0
        self.bar = None
        if interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit=unit.rstrip("s"), dynamic_ncols=True)

    def __enter__(self):
        return self

    def update(self, count: int, pass_at_1: float) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            self.bar.set_postfix_str(f"pass@1 {pass_at_1:.1%}")
        else:
            print(f"{self.label}: {self.done}/{self.total} {self.unit}, pass@1 so far {pass_at_1:.1%}", flush=True)

    def __exit__(self, *exception):
        if self.bar is not None:
            self.bar.close()


STABLE_STEPS, STABLE_SPREAD = 5, 0.10  # below 5 measured steps, or steps 10% apart, a figure is not to be trusted


def stability_warning(name: str, metrics: dict) -> str | None:
    """A warning line when a run's throughput rests on too few measured steps, or on steps too far apart."""
    if "measured_steps" not in metrics:
        return None
    if metrics["measured_steps"] < STABLE_STEPS:
        why = f"only {metrics['measured_steps']} measured step(s)"
    elif metrics["step_time_spread"] > STABLE_SPREAD:
        why = f"its step times vary by {metrics['step_time_spread']:.0%}"
    else:
        return None
    return (f"warning: {name}: {why}, so its tokens/s is not a stable figure; raise --max_train_steps "
            f"(at least {STABLE_STEPS} steps after the warm-up)")


def _throughput(metrics: dict, unit: str) -> str:
    parts = []
    if metrics.get("tokens_per_second") is not None:
        world = metrics.get("world_tokens_per_second")
        parts.append(f"{metrics['tokens_per_second']:,.0f} tokens/s"
                     + (f" per {unit} ({world:,.0f} tokens/s in all)" if world is not None else ""))
        parts.append(f"{metrics['model_tflops']:.3g} model TFLOP/s")
        parts.append(f"MFU {metrics['mfu']:.1%}" if metrics.get("mfu") is not None
                     else "no MFU (no peak TFLOP/s known for this device; set PEAK_TFLOPS)")
        if metrics.get("peak_memory_gib") is not None:
            parts.append(f"peak memory {metrics['peak_memory_gib']:.1f} GiB")
    return ", ".join(parts)


def summary(output_dir: str, best_checkpoint: str | None, metrics: dict, where: str | None,
            unit: str = "GPU") -> None:
    """The last lines of a training run: where the adapter is, what it changed, how fast it trained (per `unit`, GPU
    or process), where W&B is."""
    best = f" (the best checkpoint, {best_checkpoint})" if best_checkpoint else ""
    count = metrics["held_out_examples"]
    lines = [f"done: {metrics['global_step']} steps; adapter in {output_dir}{best}",
             f"held-out loss over {count} example{'s' * (count != 1)}: base {metrics['base_loss']:.4f} -> adapter "
             f"{metrics['adapter_loss']:.4f} (perplexity {metrics['base_perplexity']:.4g} -> "
             f"{metrics['adapter_perplexity']:.4g})"]
    if "fim_examples" in metrics:
        lines.append(f"held-out fill-in-the-middle, a line of each of {metrics['fim_examples']} files: loss base "
                     f"{metrics['fim_base_loss']:.4f} -> adapter {metrics['fim_adapter_loss']:.4f}, exact match base "
                     f"{metrics['fim_base_exact_match']:.1%} -> adapter {metrics['fim_adapter_exact_match']:.1%}")
    for prefix, title, what in (("humaneval", "HumanEval", "problems"),
                                ("humaneval_infilling", "HumanEval single-line infilling", "tasks")):
        if f"{prefix}_adapter_pass@1" in metrics:
            lines.append(f"{title} pass@1 ({metrics[f'{prefix}_{what}']} {what}): base "
                         f"{metrics[f'{prefix}_base_pass@1']:.1%} -> adapter {metrics[f'{prefix}_adapter_pass@1']:.1%}")
    throughput = _throughput(metrics, unit)
    if throughput:
        lines.append(f"throughput: {throughput}")
        lines += [warning for warning in [stability_warning("throughput", metrics)] if warning]
    if where:
        lines.append(where)
    print("\n".join(lines), flush=True)
