"""Training what the user meant: examples kept apart in packed blocks, loss on completions only, gradient
accumulation, and the chunked LM-head loss, on the embedded tiny StarCoder."""

import re

import pytest
import torch
import torch.nn.functional as F

import base_example
from conftest import tiny_args
from finetune import attention, chunked_loss, data, modeling, pipeline
from finetune.data import IGNORE_INDEX
from finetune.errors import UsageError
from flops_counter import TFLOPSCallback, flops_per_token

PAIRS = [("Add one to x.", "def inc(x):\n    return x + 1"), ("Double x.", "def double(x):\n    return 2 * x"),
         ("Negate x.", "def neg(x):\n    return -x")]


def pair_examples():
    from datasets import Dataset

    return Dataset.from_dict({"segments": [[data.format_prompt(p), " " + c] for p, c in PAIRS]})


@pytest.fixture(scope="module")
def tokenizer():
    return modeling.load_tokenizer("tiny-starcoder")


@pytest.fixture(scope="module")
def model():
    loaded = modeling.load_quantized("tiny-starcoder", "none").eval()
    attention.use(loaded)
    return loaded


def test_a_packed_example_sees_only_itself(tokenizer, model):
    encoded = data.tokenize(pair_examples(), tokenizer, seq_length=10**6)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    packed = data.pack(encoded, seq_length=sum(lengths[:2]) + 5)  # the first two whole, the third cut short
    block = packed[0]
    second = slice(lengths[0], lengths[0] + lengths[1])
    assert block["position_ids"][second.start] == 0 and block["position_ids"][second][-1] == lengths[1] - 1
    assert block["labels"][0] == block["labels"][second.start] == IGNORE_INDEX  # never predicted across examples
    with torch.no_grad():
        together = model(input_ids=torch.tensor([block["input_ids"]]),
                         position_ids=torch.tensor([block["position_ids"]])).logits[0, second]
        alone = model(input_ids=torch.tensor([encoded[1]["input_ids"]])).logits[0]
    assert torch.allclose(together, alone, atol=1e-4), (together - alone).abs().max()


def test_joined_packing_lets_examples_see_each_other(tokenizer, model):
    encoded = data.tokenize(pair_examples(), tokenizer, seq_length=10**6)
    first = len(encoded[0]["input_ids"])
    block = data.pack(encoded, seq_length=first + len(encoded[1]["input_ids"]), per_example=False)[0]
    assert "position_ids" not in block
    with torch.no_grad():
        joined = model(input_ids=torch.tensor([block["input_ids"]])).logits[0, first:]
        alone = model(input_ids=torch.tensor([encoded[1]["input_ids"]])).logits[0]
    assert not torch.allclose(joined, alone, atol=1e-3)


def test_completion_only_labels_and_loss(tokenizer, model):
    examples = pair_examples()
    full = data.tokenize(examples, tokenizer, seq_length=512)
    completion_only = data.tokenize(examples, tokenizer, seq_length=512, completion_only=True)
    assert full["input_ids"] == completion_only["input_ids"]
    for row, pair in zip(completion_only, examples):
        prompt_tokens = len(tokenizer(pair["segments"][0], add_special_tokens=False)["input_ids"])
        assert row["labels"][:prompt_tokens] == [IGNORE_INDEX] * prompt_tokens
        assert row["labels"][prompt_tokens:] == row["input_ids"][prompt_tokens:]
    batch = data.Collator(tokenizer)([completion_only[i] for i in range(3)])
    with torch.no_grad():
        output = model(**batch)
    logits, labels = output.logits[:, :-1], batch["labels"][:, 1:]
    completion = labels != IGNORE_INDEX
    by_hand = F.cross_entropy(logits[completion], labels[completion])
    assert output.loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_completion_only_is_the_default_for_pairs_and_not_for_text(tmp_path, few_examples):
    import json

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return {i} * x"}) + "\n" for i in range(4)))
    for dataset, expected in ((few_examples, True), (str(text), False)):
        args = tiny_args(tmp_path / f"out-{expected}", dataset=dataset, max_train_steps=1, eval_steps=1,
                         completion_only_loss=None, batch_size=2)
        trainer = base_example.main(args)
        labels = trainer.train_dataset[0]["labels"]
        assert (labels[0] == IGNORE_INDEX) == expected, dataset


def test_a_diverging_run_stops_at_the_step_its_weights_overflow(tmp_path, few_examples, capsys):
    """A learning rate of 1e30 makes the adapter's weights overflow in the first step: the run stops there, before
    a second step or a checkpoint, with that step's loss (taken before the update: finite) logged as it was."""
    import math

    args = tiny_args(tmp_path / "out", dataset=few_examples, max_train_steps=3, eval_steps=3, logging_steps=1,
                     learning_rate=1e30, lora_dropout=0.0, batch_size=2)
    with pytest.raises(UsageError, match="NaN or infinite by step 1 .*no checkpoint"):
        base_example.main(args)
    logged = re.findall(r"^step (\d+)/3  loss (\S+)", capsys.readouterr().out, re.MULTILINE)
    assert [step for step, _ in logged] == ["1"] and math.isfinite(float(logged[0][1])), logged


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory) -> str:
    """The embedded model's architecture without dropout, so that micro-batches and one batch draw no masks."""
    from transformers import GPTBigCodeForCausalLM

    from finetune import architecture

    directory = tmp_path_factory.mktemp("no-dropout")
    tokenizer = modeling.load_tokenizer("tiny-starcoder")
    torch.manual_seed(0)
    config = architecture.config("gpt_bigcode", "tiny", vocab_size=len(tokenizer), attn_pdrop=0.0, resid_pdrop=0.0,
                                 embd_pdrop=0.0)
    GPTBigCodeForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def first_gradients(tmp_path, model: str, **overrides) -> dict:
    """The LoRA gradients of the first optimizer step, taken just before the optimizer uses them."""
    from transformers import TrainerCallback

    from finetune import training

    captured = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n})

    args = tiny_args(tmp_path, model=model, max_train_steps=1, eval_steps=1, max_eval_samples=1, **overrides)
    run = pipeline.prepare(args)
    trainer = training.build_trainer(args, run, callbacks=[Capture()])
    training.train(trainer, args, run)
    return captured


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, no_dropout_model):
    big = first_gradients(tmp_path / "big", no_dropout_model, batch_size=4)
    accumulated = first_gradients(tmp_path / "accumulated", no_dropout_model, batch_size=2,
                                  gradient_accumulation_steps=2)
    assert big.keys() == accumulated.keys() and big
    for name in big:
        assert torch.allclose(big[name], accumulated[name], rtol=1e-4, atol=1e-7), name


def test_chunked_loss_equals_the_models_own(monkeypatch):
    from finetune import architecture
    from transformers import GPTBigCodeForCausalLM

    monkeypatch.setattr(chunked_loss, "CHUNK_TOKENS", 7)  # several chunks, one of them partial
    torch.manual_seed(0)
    reference = GPTBigCodeForCausalLM(architecture.config("gpt_bigcode", "tiny", vocab_size=256, attn_pdrop=0.0,
                                                          resid_pdrop=0.0, embd_pdrop=0.0)).train()
    chunked = GPTBigCodeForCausalLM(reference.config).train()
    chunked.load_state_dict(reference.state_dict())
    chunked_loss.use(chunked)
    ids = torch.randint(0, 256, (2, 12))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    losses = []
    for model in (reference, chunked):
        model.lm_head.weight.requires_grad_(False)  # the tied head is frozen, as under LoRA
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        losses.append((loss.item(), model.transformer.h[0].mlp.c_fc.weight.grad.clone()))
    assert chunked(input_ids=ids, labels=labels).logits is None  # never all logits at once
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-6)
    assert torch.allclose(losses[1][1], losses[0][1], atol=1e-7)


def test_flops_counter_charges_attention_per_packed_example(tokenizer, model):
    callback = TFLOPSCallback(warmup_steps=0)
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args, state = TrainingArguments(output_dir="unused", use_cpu=True), TrainerState()
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    model.train()
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        model(input_ids=torch.zeros_like(positions), position_ids=positions)
    model.eval()
    tokens, examples, squares = callback.counts.tolist()
    assert (tokens, squares, examples) == (10, 3**2 + 2**2 + 5**2, 3)
    expected = sum(n * flops_per_token(model, n).model for n in (3, 2, 5))
    assert callback.flops_of(tokens, [squares])[0] == pytest.approx(expected)
    callback.on_train_end(args, state, TrainerControl())
