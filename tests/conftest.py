import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Offline everywhere: a Hub lookup fails at once instead of retrying, W&B never prompts or uploads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)
os.environ.setdefault("STARCODER_LORA_CACHE", str(ROOT / ".pytest_cache" / "embedded"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from finetune.cli import TrainArguments  # noqa: E402

# The scripts import the heavy libraries only once their arguments parse. Import them here, before any test captures
# stderr: their loggers keep the stream they find at import, and one captured and closed would fail later tests.
import datasets  # noqa: E402, F401
import transformers  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _fresh_wandb_env(monkeypatch):
    # setup_wandb writes these into os.environ; each test starts without them.
    for name in ("WANDB_PROJECT", "WANDB_DIR", "WANDB_MODE", "WANDB_RUN_GROUP", "WANDB_RUN_ID", "WANDB_RESUME",
                 "WANDB_JOB_TYPE"):
        monkeypatch.delenv(name, raising=False)


def on_triton_interpreter(code: str) -> str:
    """Run `code` in a fresh Python with Triton's CPU interpreter (TRITON_INTERPRET=1, read at import): our GPU
    kernels, here. Returns its standard output; fails the test with its error if it fails."""
    import subprocess

    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1",  # and the packages a PYTHONPATH adds
                               "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def spy(monkeypatch, owner, name: str) -> list:
    """Wrap owner.name so that each call is recorded (its arguments) and still made; returns the record."""
    calls, real = [], getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


def tiny_args(output_dir, **overrides) -> TrainArguments:
    """A few-second run on the embedded model: short sequences, few steps, no W&B unless asked. The loss is on whole
    examples: at 64 tokens many stdlib-code docstrings leave no completion to train on."""
    settings = dict(model="tiny-starcoder", dataset="stdlib-code", seq_length=64, batch_size=4, max_train_steps=6,
                    eval_steps=3, logging_steps=1, max_eval_samples=8, report_to="none", completion_only_loss=False,
                    output_dir=str(output_dir))
    settings.update(overrides)
    return TrainArguments(**settings)


def train_counting_forwards(args: TrainArguments):
    """Train a run through the pipeline; returns each decoder layer's checkpointing flag, how often its MLP ran a
    forward (again in a checkpointed layer's recompute), and the logged losses."""
    from finetune import modeling, pipeline, training

    run = pipeline.prepare(args)
    layers = modeling.decoder_layers(run.model)
    calls = [0] * len(layers)
    for index, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    trainer = training.build_trainer(args, run)
    training.train(trainer, args, run)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return [layer.gradient_checkpointing for layer in layers], calls, losses


def with_flags(common: list[str], extra: list[str]) -> list[str]:
    """`common` flag-value pairs with those that `extra` gives again left out (a flag given twice is refused), then
    `extra`."""
    given = {token for token in extra if token.startswith("--")}
    kept = [token for pair in zip(common[::2], common[1::2]) if pair[0] not in given for token in pair]
    return kept + extra


@pytest.fixture
def few_examples(tmp_path) -> str:
    """Three short prompt/completion pairs: one is held out, the other two form the same batch at every step."""
    path = tmp_path / "few.jsonl"
    pairs = [("Add one to x.", "def inc(x):\n    return x + 1"),
             ("Double x.", "def double(x):\n    return 2 * x"),
             ("Negate x.", "def neg(x):\n    return -x")]
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    return str(path)
