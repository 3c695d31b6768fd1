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


def _throughput(metrics: dict) -> str:
    parts = []
    if metrics.get("tokens_per_second") is not None:
        world = metrics.get("world_tokens_per_second")
        parts.append(f"{metrics['tokens_per_second']:,.0f} tokens/s"
                     + (f" per GPU ({world:,.0f} tokens/s in all)" if world is not None else ""))
        parts.append(f"{metrics['model_tflops']:.3g} model TFLOP/s")
        parts.append(f"MFU {metrics['mfu']:.1%}" if metrics.get("mfu") is not None
                     else "no MFU (no peak TFLOP/s known for this device; set PEAK_TFLOPS)")
        if metrics.get("peak_memory_gib") is not None:
            parts.append(f"peak memory {metrics['peak_memory_gib']:.1f} GiB")
    return ", ".join(parts)


def summary(output_dir: str, best_checkpoint: str | None, metrics: dict, where: str | None) -> None:
    """The last lines of a training run: where the adapter is, what it changed, how fast it trained, where W&B is."""
    best = f" (the best checkpoint, {best_checkpoint})" if best_checkpoint else ""
    lines = [f"done: {metrics['global_step']} steps; adapter in {output_dir}{best}",
             f"held-out loss: base {metrics['base_loss']:.4f} -> adapter {metrics['adapter_loss']:.4f} (perplexity "
             f"{metrics['base_perplexity']:.4g} -> {metrics['adapter_perplexity']:.4g})"]
    if "humaneval_adapter_pass@1" in metrics:
        lines.append(f"HumanEval pass@1 ({metrics['humaneval_problems']} problems): base "
                     f"{metrics['humaneval_base_pass@1']:.1%} -> adapter {metrics['humaneval_adapter_pass@1']:.1%}")
    throughput = _throughput(metrics)
    if throughput:
        lines.append(f"throughput: {throughput}")
    if where:
        lines.append(where)
    print("\n".join(lines), flush=True)
