"""The workflow a Trainer, TRL or axolotl user brings: conversations, held-out files and splits, epochs, settings
files, the Hub's model card and upload, training on a finished run, and what the scripts print and write."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import base_example
import generate
from conftest import ROOT, tiny_args
from finetune import cli, data, hub, modeling
from finetune.cli import TrainArguments
from finetune.data import IGNORE_INDEX
from finetune.sweep import SweepArguments

CONVERSATIONS = [
    [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Add one to x."},
     {"role": "assistant", "content": "def inc(x):\n    return x + 1"},
     {"role": "user", "content": "Now double it."},
     {"role": "assistant", "content": "def double(x):\n    return 2 * x"}],
    [{"role": "user", "content": "Negate x."}, {"role": "assistant", "content": "def neg(x):\n    return -x"}],
]


def write_conversations(path: Path, copies: int = 3) -> str:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS * copies))
    return str(path)


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX])


@pytest.mark.parametrize("model", ["tiny-starcoder", "tiny-qwen2"])
def test_conversations_train_every_assistant_turn_and_nothing_else(tmp_path, model):
    tokenizer = modeling.load_tokenizer(model)
    examples, data_format = data.load_examples(write_conversations(tmp_path / "chat.jsonl", 1), tokenizer=tokenizer)
    assert data_format == ("chat_template" if model == "tiny-qwen2" else "question_answer")
    encoded = data.tokenize(examples, tokenizer, 512, completion_only=True, append_eos=data_format != "chat_template")
    first = encoded[0]
    text = tokenizer.decode(first["input_ids"])
    trained = trained_text(tokenizer, first["input_ids"], first["labels"])
    assert "return x + 1" in trained and "return 2 * x" in trained  # both assistant turns
    assert "Add one to x" not in trained and "Now double it" not in trained and "You write Python" not in trained
    if model == "tiny-qwen2":  # the template's own turns, each assistant turn's end token trained with it
        assert text.startswith("<|im_start|>system\nYou write Python.<|im_end|>")
        assert trained.count("<|im_end|>") == 2 and "<|im_start|>" not in trained
    else:  # StarCoder's Question/Answer format, each answer ending with the end-of-text token
        assert text.startswith("You write Python.\n\nQuestion: Add one to x.\n\nAnswer: def inc(x)")
        assert trained.count("<|endoftext|>") == 2
    packed = data.tokenize(examples, tokenizer, 64, packing=True, completion_only=True)
    assert all(len(block["input_ids"]) == 64 for block in packed)


def test_a_conversation_run_trains_and_generate_wraps_prompts_in_the_chat_template(tmp_path, capsys):
    out = tmp_path / "out"
    base_example.main(tiny_args(out, model="tiny-qwen2", dataset=write_conversations(tmp_path / "chat.jsonl"),
                                packing=True, seq_length=64, max_train_steps=2, eval_steps=2, batch_size=1,
                                completion_only_loss=None))
    assert json.loads((out / "run_config.json").read_text())["data_format"] == "chat_template"
    capsys.readouterr()
    results = generate.main(generate.GenerateArguments(adapter=str(out), quantization="none", prompt=["Hi"],
                                                       max_new_tokens=3))
    assert len(results["completions"]) == 1
    from finetune import inference

    tokenizer = modeling.load_tokenizer("tiny-qwen2")
    assert inference.wrap("Hi", "chat_template", tokenizer) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_held_out_data_from_its_own_file_is_counted_and_few_examples_warned_about(tmp_path, capsys, few_examples):
    out = tmp_path / "out"
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"Triple {n}.", "completion": f"{3 * n}"}) + "\n" for n in range(5)))
    trainer = base_example.main(tiny_args(out, dataset=few_examples, eval_dataset=str(held), batch_size=3,
                                          max_train_steps=1, eval_steps=1))
    assert len(trainer.train_dataset) == 3 and len(trainer.eval_dataset) == 5  # every pair trains; the file holds out
    output = capsys.readouterr().out
    assert "warning: the held-out loss is over 5 examples (fewer than 20)" in output
    assert "held-out loss over 5 examples: base " in output


def test_steps_by_epochs_and_the_step_count_winning(tmp_path, capsys):
    path = tmp_path / "ten.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{n}", "completion": f"c{n}"}) + "\n" for n in range(11)))
    trainer = base_example.main(tiny_args(tmp_path / "a", dataset=str(path), batch_size=2, num_train_epochs=2,
                                          max_train_steps=None, eval_steps=100))
    assert trainer.state.global_step == 10  # 10 training examples at 2 a step, twice
    assert "2 epoch(s) of 10 training examples at 2 a step: 10 steps" in capsys.readouterr().out
    trainer = base_example.main(tiny_args(tmp_path / "b", dataset=str(path), batch_size=2, num_train_epochs=2,
                                          max_train_steps=3, eval_steps=100))
    assert trainer.state.global_step == 3
    assert "--max_train_steps 3 wins over --num_train_epochs 2" in capsys.readouterr().out


def test_a_settings_file_with_flags_over_it(tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text("recipe: lean\nmodel: tiny-starcoder\nlora_r: 8\npacking: true\nwarmup_steps: null\n")
    (args,) = cli.parse(TrainArguments, argv=[str(settings), "--lora_r", "4"])
    assert (args.lora_r, args.batch_size, args.gradient_checkpointing, args.model) == (4, 2, True, "tiny-starcoder")
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"lora_alpha": 64, "packing": False}))
    (args,) = cli.parse(TrainArguments, argv=[str(as_json)])
    assert args.lora_alpha == 64 and not args.packing
    listed = tmp_path / "listed.yaml"  # a YAML list for a comma-separated setting
    listed.write_text("lora_target_modules: [c_attn, c_fc]\nsweep_batch_sizes: [1, 2]\n")
    args, sweeping = cli.parse(TrainArguments, SweepArguments, argv=[str(listed)])
    assert args.lora_target_modules == "c_attn,c_fc" and sweeping.batch_sizes == [1, 2]


@pytest.mark.parametrize("text,message", [
    ("lora_rank: 8\n", "unknown setting 'lora_rank'"),
    ("lora_r: 8\nlora_r: 9\n", "sets lora_r twice"),
    ("lora_r: eight\n", "invalid int value"),
    ("- a\n- b\n", "must hold a mapping"),
    ("lora_r: [8\n", "is not valid YAML"),
    ("lora_r: {a: 1}\n", "must be a value, not a mapping"),
    ("lora_r: [8, 16]\n", "lora_r takes one value, not a list"),
    ("lora_target_modules: [[c_attn]]\n", "lora_target_modules's list must hold plain values"),
])
def test_a_bad_settings_file_is_one_line(tmp_path, text, message):
    settings = tmp_path / "bad.yaml"
    settings.write_text(text)
    with pytest.raises(cli.UsageError, match=re.escape(message)):
        cli.parse(TrainArguments, argv=[str(settings)])


def readme_settings_files() -> dict[str, dict]:
    """The README's recipes, written as settings files (```yaml blocks headed `# <recipe>.yaml`)."""
    import yaml

    blocks = re.findall(r"```yaml\n# (\w+)\.yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return {name: yaml.safe_load(body) for name, body in blocks}


def test_the_readme_documents_every_recipe_as_a_settings_file():
    documented = readme_settings_files()
    assert documented.keys() == cli.RECIPES.keys()
    for name, settings in documented.items():
        assert settings == cli.RECIPES[name], name


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    args = tiny_args(out, max_train_steps=6, eval_steps=3, learning_rate=1e-3, warmup_steps=0)
    trainer = base_example.main(args)
    return args, trainer


def test_every_finished_run_has_a_model_card_the_hub_reads(finished):
    from huggingface_hub import ModelCard

    args, _ = finished
    card = ModelCard.load(Path(args.output_dir) / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.eval_results[0].metric_type == "loss"
    assert "Held-out loss over 8 examples" in card.text and "`lora_r`: 16" in card.text
    assert json.loads((Path(args.output_dir) / "manifest.json").read_text())["outputs"]["README.md"]


def test_the_card_names_a_hub_base_and_data_and_never_a_token(monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.setenv("HF_TOKEN", "hf_PlantedTokenForTheCardTest")
    args = TrainArguments(model="bigcode/starcoder2-3b", dataset="HuggingFaceH4/CodeAlpaca_20K",
                          hf_token="hf_PlantedTokenForTheCardTest", hub_model_id="me/my-adapter", report_to="none")
    metrics = {"global_step": 60, "held_out_examples": 64, "base_loss": 1.5, "adapter_loss": 1.2,
               "base_perplexity": 4.48, "adapter_perplexity": 3.32, "humaneval_base_pass@1": 0.3,
               "humaneval_adapter_pass@1": 0.35, "tokens_per_second": 8000.0, "model_tflops": 500.0}
    text = hub.card(args, metrics, "NVIDIA H200")
    card = ModelCard(text)
    assert card.data.base_model == "bigcode/starcoder2-3b" and card.data.datasets == ["HuggingFaceH4/CodeAlpaca_20K"]
    assert "base_model:adapter:bigcode/starcoder2-3b" in card.data.tags
    assert {r.metric_type for r in card.data.eval_results} == {"loss", "pass@1"}
    assert card.data.model_name == "me/my-adapter"
    assert "hf_PlantedToken" not in text and "8,000 tokens/s" in text and "NVIDIA H200" in text


class StandInHub:
    """What cannot run here: the Hub. Records what the run asks of it."""
    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private))
        return type("RepoUrl", (), {"repo_id": f"me/{repo_id}" if "/" not in repo_id else repo_id})()

    def upload_folder(self, folder_path, repo_id, allow_patterns=None, commit_message=None):
        self.calls.append(("upload_folder", repo_id, sorted(allow_patterns)))


def test_push_to_hub_uploads_the_adapter_folder_privately(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", StandInHub)
    monkeypatch.setenv("HF_TOKEN", "hf_StandInToken")
    StandInHub.calls = []
    base_example.main(tiny_args(tmp_path / "out", max_train_steps=1, eval_steps=1, push_to_hub=True))
    (create, upload) = StandInHub.calls
    assert create == ("create_repo", "out", True)
    uploaded = upload[2]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "manifest.json"} - set(uploaded) == \
        {"manifest.json"}  # written after the list: its record of the run stays local
    assert not any(name.startswith(("checkpoint", "wandb")) or name in hub.NOT_UPLOADED for name in uploaded)
    assert "uploaded to https://huggingface.co/me/out (private)" in capsys.readouterr().out


@pytest.mark.parametrize("network", [
    {"HF_HUB_OFFLINE": "1"},  # offline mode: huggingface_hub's own error
    {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # a refused connection: the HTTP client's error
])
def test_without_a_network_the_adapter_stays_local_and_the_run_says_how_to_upload(tmp_path, network):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "base_example.py", "--model", "tiny-starcoder", "--dataset", "stdlib-code",
                           "--seq_length", "64", "--max_train_steps", "1", "--eval_steps", "1", "--report_to", "none",
                           "--push_to_hub", "--hub_model_id", "me/adapter", "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_TOKEN="hf_StandInToken", **network))
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "not uploaded" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: the adapter was not uploaded")
    assert f"hf upload me/adapter {out} --private --include" in lines[0]
    assert (out / "manifest.json").is_file()


def test_push_to_hub_without_a_token_is_refused_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # no cached login either
    with pytest.raises(SystemExit) as exit_info:
        cli.run(base_example.main, TrainArguments, argv=["--model", "tiny-starcoder", "--dataset", "stdlib-code",
                                                         "--report_to", "none", "--push_to_hub",
                                                         "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--push_to_hub needs a Hugging Face token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_raising_the_steps_of_a_finished_run_trains_on_with_a_schedule_of_its_own(finished, capsys):
    from transformers import get_scheduler

    args, trainer = finished
    def cosine(steps):
        dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        return get_scheduler("cosine", dummy, num_warmup_steps=0, num_training_steps=steps).lr_lambdas[0]

    # the Trainer logs the rate each step used: step k, the schedule's value after k - 1 steps
    rates = {row["step"]: row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row}
    assert rates[6] == pytest.approx(args.learning_rate * cosine(6)(5))  # the last step of a decayed schedule
    more = base_example.main(tiny_args(args.output_dir, max_train_steps=9, eval_steps=3, learning_rate=1e-3,
                                       warmup_steps=0))
    added = {row["step"]: row["learning_rate"] for row in more.state.log_history
             if "learning_rate" in row and row["step"] > 6}
    # the 3 added steps from the peak again, decaying over them (stretched, step 7 would take cosine(9)(6), 25%)
    assert added == pytest.approx({6 + k: args.learning_rate * cosine(3)(k - 1) for k in (1, 2, 3)})
    assert "training on from step 6 of a finished run: a new cosine schedule over the 3 added steps" in \
        capsys.readouterr().out


def test_help_parses_before_the_heavy_libraries_load():
    for script in ("base_example.py", "base_with_tflops.py", "karpathy_speedups_example.py", "generate.py"):
        code = (f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
                f"try:\n    runpy.run_path({script!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
                "print(sorted(m for m in ('torch', 'peft', 'datasets', 'transformers.trainer', 'bitsandbytes')"
                " if m in sys.modules), file=sys.stderr)")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert done.stderr.strip().splitlines()[-1] == "[]", (script, done.stderr[-500:])
        assert "--output_dir" in done.stdout or "--adapter" in done.stdout


def test_files_are_written_with_the_umask(tmp_path):
    code = ("import os; os.umask(0o027)\nimport runpy, sys\n"
            f"sys.argv = ['base_example.py', '--model', 'tiny-starcoder', '--dataset', 'stdlib-code', '--report_to', "
            f"'none', '--max_train_steps', '1', '--eval_steps', '1', '--seq_length', '32', '--max_eval_samples', "
            f"'2', '--completion_only_loss', 'false', '--output_dir', {str(tmp_path / 'out')!r}]\n"
            "runpy.run_path('base_example.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "out").rglob("*")}
    assert modes["adapter_model.safetensors"] == 0o640 and modes["README.md"] == 0o640
    assert all(mode in (0o640, 0o750) for name, mode in modes.items() if not name.startswith(".")), modes
    merged = tmp_path / "merged"
    code = ("import os; os.umask(0o022)\nimport runpy, sys\n"
            f"sys.argv = ['generate.py', '--adapter', {str(tmp_path / 'out')!r}, '--merge', '--merged_dir', "
            f"{str(merged)!r}]\nrunpy.run_path('generate.py', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert merged.stat().st_mode & 0o777 == 0o755 and (merged / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert "warn" not in done.stderr.lower(), done.stderr  # generate.py prints no library warning either


def test_the_readmes_default_output_directories_are_ignored_by_git():
    names = ["outputs/", "merged/", "sweep/", "sweep24/"]
    done = subprocess.run(["git", "check-ignore", *names], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == names


def test_part_one_shows_its_two_configurations_literally():
    source = (ROOT / "base_example.py").read_text()
    assert "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", bnb_4bit_use_double_quant=True" in source
    assert "LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout" in source
