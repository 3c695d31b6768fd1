"""Preemption-safe runs in real processes: SIGTERM and resume, SIGKILL during a checkpoint write, secrets kept out."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, with_flags
from finetune import checkpointing, cli

COMMON = ["--model", "tiny-starcoder", "--dataset", "stdlib-code", "--seq_length", "64", "--completion_only_loss",
          "false", "--batch_size", "4", "--max_train_steps", "24", "--eval_steps", "6", "--logging_steps", "1",
          "--max_eval_samples", "8", "--report_to", "none"]


def launch(argv: list[str], prelude: str = "") -> subprocess.Popen:
    """base_example.py in a child process; `prelude` runs first (the tests' instrumentation, never the product's)."""
    code = f"import sys; sys.argv = ['base_example.py'] + {argv!r}\n{prelude}\nimport runpy\n" \
           f"runpy.run_path('base_example.py', run_name='__main__')"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(process: subprocess.Popen, predicate, timeout: float = 240) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if predicate(lines):
            return lines
    raise AssertionError("child never reached the expected point:\n" + "".join(lines[-30:]))


def losses_by_step(output_dir: Path) -> dict[int, float]:
    state = json.loads((checkpointing.complete_checkpoints(str(output_dir))[-1] / "trainer_state.json").read_text())
    return {row["step"]: row["loss"] for row in state["log_history"] if "loss" in row}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    done = subprocess.run([sys.executable, "base_example.py", *COMMON, "--output_dir", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return losses_by_step(out)


def test_sigterm_writes_a_checkpoint_and_the_rerun_resumes_identically(tmp_path, uninterrupted):
    out = tmp_path / "out"
    argv = [*COMMON, "--output_dir", str(out)]
    child = launch(argv)
    wait_for(child, lambda lines: sum("  loss " in line for line in lines) >= 8)  # mid-run, past a checkpoint
    child.send_signal(signal.SIGTERM)
    rest, _ = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, rest[-3000:]
    assert "SIGTERM received" in rest and "Run the same command again to resume" in rest
    assert "Traceback" not in rest
    checkpoints = checkpointing.complete_checkpoints(str(out))
    stopped_at = checkpointing.step_of(checkpoints[-1])
    assert 8 <= stopped_at < 24, "the stop wrote a checkpoint at the step in flight"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (checkpoints[-1] / name).is_file(), name

    rerun = subprocess.run([sys.executable, "base_example.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = losses_by_step(out)
    assert max(resumed) == 24
    for step in range(stopped_at + 1, 25):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5, abs=1e-6), step


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "out"
    argv = [*COMMON, "--output_dir", str(out)]
    # The second commit announces itself and stalls: the child is killed with its checkpoint half written.
    slow_second_commit = """
import time, finetune.checkpointing as checkpointing
original, calls = checkpointing.commit, []
def commit(staged, final, best_step):
    calls.append(final)
    if len(calls) == 2:
        print('SLOW COMMIT', final, flush=True)
        (staged / 'adapter_model.safetensors').write_bytes(b'half written')
        time.sleep(600)
    original(staged, final, best_step)
checkpointing.commit = commit
"""
    child = launch(argv, prelude=slow_second_commit)
    wait_for(child, lambda lines: "SLOW COMMIT" in lines[-1])
    child.kill()
    child.wait(timeout=30)
    assert [c.name for c in checkpointing.complete_checkpoints(str(out))] == ["checkpoint-6"]
    assert (out / checkpointing.STAGING / "checkpoint-12").is_dir()  # the partial one, never committed

    rerun = subprocess.run([sys.executable, "base_example.py", *argv], cwd=ROOT, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    state = json.loads((out / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["global_step"] == 24
    assert not (out / checkpointing.STAGING / "checkpoint-12").exists()
    resumed_steps = [row["step"] for row in state["log_history"] if "loss" in row]
    assert resumed_steps == sorted(set(resumed_steps)), "steps after 6 were trained once, from checkpoint-6"


FAKE_HF = "hf_FAKEplantedTOKEN1234567890abcdef"
FAKE_WANDB = "0123456789abcdef0123456789abcdef01234567"
FAKE_ARG = "hf_ARGUMENTplantedTOKEN0987654321"


def test_planted_secrets_appear_nowhere(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_TOKEN=FAKE_HF, WANDB_API_KEY=FAKE_WANDB, WANDB_MODE="offline")
    done = subprocess.run([sys.executable, "base_with_tflops.py",
                           *with_flags(COMMON, ["--max_train_steps", "6", "--report_to", "wandb", "--hf_token",
                                                FAKE_ARG, "--output_dir", str(out)])],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "manifest.json").is_file() and list(out.glob("wandb/offline-run-*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arguments"]["TrainArguments"]["hf_token"] == "***"
    assert manifest["versions"]["transformers"] and manifest["git_commit"] and manifest["metrics"]["global_step"] == 6
    secrets = [s.encode() for s in (FAKE_HF, FAKE_WANDB, FAKE_ARG)]
    for path in out.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert not any(secret in content for secret in secrets), f"a secret leaked into {path}"
    assert not any(secret.decode() in done.stdout + done.stderr for secret in secrets)


def test_another_configuration_in_the_output_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    argv = with_flags(COMMON, ["--max_train_steps", "2", "--eval_steps", "2", "--output_dir", str(out)])
    import base_example

    cli.run(base_example.main, cli.TrainArguments, argv=argv)
    before = sorted(str(p) for p in out.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli.run(base_example.main, cli.TrainArguments, argv=[*argv, "--lora_r", "8"])
    assert exit_info.value.code == 2
    assert "another configuration (lora_r: 16 -> 8)" in capsys.readouterr().err
    assert sorted(str(p) for p in out.rglob("*")) == before, "nothing was overwritten"
    cli.run(base_example.main, cli.TrainArguments, argv=[*argv, "--lora_r", "8", "--overwrite_output_dir"])
    assert json.loads((out / checkpointing.RUN_CONFIG).read_text())["lora_r"] == 8


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    from wandb_records import history, offline_runs, records

    import base_example

    argv = with_flags(COMMON, ["--max_train_steps", "2", "--eval_steps", "2", "--report_to", "wandb",
                               "--output_dir", str(tmp_path / "out")])
    cli.run(base_example.main, cli.TrainArguments, argv=argv)
    os.environ.pop("WANDB_RUN_ID")  # a new process would start without it
    cli.run(base_example.main, cli.TrainArguments, argv=with_flags(argv, ["--max_train_steps", "4"]))
    runs = offline_runs(str(tmp_path / "out"))  # one directory per start, or one shared within the same second
    ids = {record.run.run_id for run in runs for record in records(run) if record.WhichOneof("record_type") == "run"}
    assert ids == {(tmp_path / "out" / "wandb_run_id").read_text()}, (runs, ids)
    steps = {row.get("train/global_step") for run in runs for row in history(run)}
    assert 4 in steps  # the resumed part was logged under the same run id
