"""Using the adapter: generation proves it is applied, evaluation shows it helped, merging keeps its logits."""

import json

import pytest
import torch
from peft import PeftModel

import base_example
import generate
from conftest import tiny_args
from finetune import cli, data, evaluation, inference, modeling
from generate import GenerateArguments

PAIRS = [("Add one to x.", "def inc(x):\n    return x + 1"),
         ("Double x.", "def double(x):\n    return 2 * x"),
         ("Negate x.", "def neg(x):\n    return -x")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An adapter that memorised two of three pairs (the third is held out by the split)."""
    root = tmp_path_factory.mktemp("memorise")
    dataset = root / "pairs.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS))
    args = tiny_args(root / "out", dataset=str(dataset), batch_size=2, max_train_steps=150, eval_steps=50,
                     logging_steps=50, learning_rate=1e-2, quantization="none")
    trainer = base_example.main(args)
    trained_texts, _ = data.split(data.load_examples(str(dataset))[0], args.max_eval_samples, args.seed)
    return args, trainer, trained_texts


def test_generation_returns_the_memorised_completions(trained):
    args, _, texts = trained
    prompts = [prompt.removeprefix("Question: ").removesuffix("\n\nAnswer:") for prompt, _ in texts["segments"]]
    expected = [completion.removeprefix(" ") for _, completion in texts["segments"]]
    options = GenerateArguments(adapter=args.output_dir, quantization="none", prompt=prompts, max_new_tokens=24)
    assert generate.main(options)["completions"] == expected

    model, tokenizer = inference.load_with_adapter(args.output_dir, args.model, "none")
    with model.disable_adapter():  # the base alone does not know them
        completions = inference.complete(model, tokenizer, prompts, "question_answer", 24, {})
        assert all(a != b for a, b in zip(completions, expected))


def test_adapter_lowers_the_loss_on_its_examples(trained):
    args, trainer, texts = trained
    tokenizer = modeling.load_tokenizer(args.model)
    comparison = evaluation.compare(trainer.model, data.tokenize(texts, tokenizer, args.seq_length), tokenizer, 2)
    assert comparison["adapter_loss"] < comparison["base_loss"] - 1.0
    assert comparison["adapter_perplexity"] < comparison["base_perplexity"]
    logged = [row for row in trainer.state.log_history if "eval_base_loss" in row]
    assert logged, "the training script reports base vs adapter at the end"
    assert trainer.state.log_history[0]["step"] == 0 and "eval_loss" in trainer.state.log_history[0]  # at the start


def test_merged_model_matches_base_plus_adapter(trained, tmp_path):
    args, _, _ = trained
    merged = generate.main(GenerateArguments(adapter=args.output_dir, merge=True, merged_dir=str(tmp_path / "m")))
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    base = modeling.load_quantized(modeling.adapter_base(args.output_dir), "none")
    with_adapter = PeftModel.from_pretrained(base, args.output_dir).eval()
    reloaded = modeling.load_quantized(str(tmp_path / "m"), "none").eval()
    ids = torch.randint(0, 4000, (2, 24))
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        assert torch.allclose(merged.eval()(input_ids=ids).logits, expected, atol=1e-4)
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-4)


def test_an_adapter_from_another_base_is_refused(trained, tmp_path, capsys):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    other = tmp_path / "other-base"
    GPTBigCodeForCausalLM(GPTBigCodeConfig(vocab_size=4096, n_embd=96, n_layer=2, n_head=4)).save_pretrained(other)
    modeling.load_tokenizer("tiny-starcoder").save_pretrained(other)
    args, _, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        cli.run(generate.main, GenerateArguments, argv=["--adapter", args.output_dir, "--model", str(other),
                                                         "--merge", "--merged_dir", str(tmp_path / "m")])
    assert exit_info.value.code == 2
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_evaluate_uses_the_runs_own_data_unless_told(trained, capsys):
    args, _, _ = trained
    own = generate.main(GenerateArguments(adapter=args.output_dir, quantization="none", evaluate=True))
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{args.dataset}: held-out loss over 1 example: base ")
    other = generate.main(GenerateArguments(adapter=args.output_dir, quantization="none", evaluate=True,
                                            dataset="stdlib-code", seq_length=64, max_eval_samples=4))
    # (after a warning that some of stdlib-code's examples keep no completion token within 64 tokens)
    assert capsys.readouterr().out.splitlines()[-1].startswith("stdlib-code: held-out loss over 4 examples: base ")
    assert own["evaluation"]["adapter_loss"] < own["evaluation"]["base_loss"] - 1.0  # it memorised its own data
    assert other["evaluation"] != own["evaluation"]
