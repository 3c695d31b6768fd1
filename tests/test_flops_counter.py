"""flops_counter: FLOPs per token against torch's FlopCounterMode, the callback's arithmetic, and its W&B logging."""

import itertools
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import (AutoModelForCausalLM, GPT2Config, GPTBigCodeConfig, LlamaConfig, Starcoder2Config,
                          TrainerControl, TrainerState, TrainingArguments)

import base_with_tflops
from conftest import ROOT, tiny_args
from finetune import modeling
from flops_counter import TFLOPSCallback, flops_per_token, peak_tflops
from wandb_records import history, offline_runs

VOCAB, SEQ, BATCH = 256, 32, 2
CONFIGS = {
    "gpt_bigcode_multi_query": (GPTBigCodeConfig(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                                 multi_query=True), ["c_attn", "c_proj"]),
    "gpt_bigcode_multi_head": (GPTBigCodeConfig(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                                multi_query=False), ["c_attn", "c_proj"]),
    "starcoder2_grouped_query": (Starcoder2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                                 ["q_proj", "v_proj"]),
    "llama": (LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2), ["q_proj", "v_proj"]),
    "gpt2": (GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                        eos_token_id=0), ["c_attn"]),
}


def build(name: str, lora: bool, checkpointing: bool):
    config, targets = CONFIGS[name]
    torch.manual_seed(0)
    # Eager attention: FlopCounterMode's SDPA rule fails on multi-query shapes on some torch versions.
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, lora_dropout=0.0,
                                                 fan_in_fan_out=name == "gpt2"))  # GPT-2's Conv1D stores W^T
    if checkpointing:
        # Reentrant checkpointing recomputes each layer's whole forward (the convention for hardware FLOPs);
        # with a frozen base it needs the embeddings' output to require grad, as peft arranges.
        enable_checkpointing(model)
        model.enable_input_require_grads()
    return model.train()


def enable_checkpointing(model) -> None:
    """Reentrant checkpointing, by transformers' new name for it where it has one (5.2x deprecated the old)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def measured_flops_per_token(model) -> float:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops() / (BATCH * SEQ)


@pytest.mark.parametrize("name,lora,checkpointing", list(itertools.product(CONFIGS, [False, True], [False, True])))
def test_flops_per_token_matches_flop_counter_mode(name, lora, checkpointing):
    model = build(name, lora, checkpointing)
    ours = flops_per_token(model, SEQ, gradient_checkpointing=checkpointing)
    attention = ours.breakdown["attention_forward"] + ours.breakdown["attention_backward"]
    # FlopCounterMode charges the full score and value matmuls; we charge causal attention as half of them. Add the
    # other half back: of the forward, the backward, and (with checkpointing) the recomputed forward.
    recomputed_attention = ours.breakdown["attention_forward"] if checkpointing else 0.0
    expected = ours.hardware + attention + recomputed_attention
    assert measured_flops_per_token(model) == pytest.approx(expected, rel=0.01)
    assert sum(ours.breakdown.values()) == pytest.approx(ours.model)
    assert (ours.hardware > ours.model) == checkpointing


@pytest.mark.parametrize("name", ["gpt_bigcode_multi_query", "starcoder2_grouped_query"])
def test_flops_per_token_counts_each_layer_as_its_checkpointing_is_set(name):
    """finetune's partial checkpointing (the first layers only): `gradient_checkpointing=None` reads each layer's
    own setting, as the callback does; the recompute is then one layer's of two."""
    model = build(name, lora=True, checkpointing=True)
    modeling.checkpoint_only_first(model, 1)
    ours, every, none = (flops_per_token(model, SEQ, gradient_checkpointing=c) for c in (None, True, False))
    assert ours.model == every.model == none.model
    assert ours.hardware - none.hardware == pytest.approx((every.hardware - none.hardware) / 2)
    attention = ours.breakdown["attention_forward"] + ours.breakdown["attention_backward"]
    recomputed_attention = ours.breakdown["attention_forward"] / 2  # FlopCounterMode: full attention, one layer
    assert measured_flops_per_token(model) == pytest.approx(ours.hardware + attention + recomputed_attention,
                                                            rel=0.01)


def test_frozen_base_costs_four_flops_per_weight_and_lora_six():
    model = build("gpt_bigcode_multi_query", lora=True, checkpointing=False)
    ours = flops_per_token(model, 0).breakdown  # no attention at length 0: linear layers alone
    frozen = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("base_layer"))
    assert ours["linear_weight_grad"] == pytest.approx(
        2 * sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and n.endswith("weight")))
    assert ours["linear_forward"] >= 2 * frozen


def test_4bit_layers_count_like_the_linear_layers_they_replace():
    from transformers import BitsAndBytesConfig

    config, _ = CONFIGS["gpt_bigcode_multi_query"]
    plain = AutoModelForCausalLM.from_config(config)
    quantized = type(plain).from_pretrained(
        None, config=config, state_dict=plain.state_dict(),
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32))
    assert type(quantized.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    for p in plain.parameters():
        p.requires_grad_(False)
    for p in quantized.parameters():
        p.requires_grad_(False)
    assert flops_per_token(quantized, SEQ).model == flops_per_token(plain, SEQ).model


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_the_bench_s_formulas_let_flop_counter_mode_count_bitsandbytes_layers(quantization):
    """bench/recipes.py --verify_flops counts a quantized base's custom matmul ops with its own formulas: with them,
    FlopCounterMode counts a 4-bit or LLM.int8 model as it counts the same model in bf16 (on 2026-12-06 the 8-bit
    tutorial recipe's count missed every forward matmul)."""
    from bench.recipes import bitsandbytes_flop_formulas
    from finetune import modeling

    def counted(kind: str) -> float:
        model = modeling.load_model("tiny-starcoder", modeling.quantization_config(kind, torch.float32),
                                    torch.float32)
        model = modeling.add_lora(model, modeling.lora_config(4, 8, 0.0, "c_attn,c_proj"), True)
        model.get_base_model().set_attn_implementation("eager")
        counter = FlopCounterMode(display=False, custom_mapping=bitsandbytes_flop_formulas())
        ids = torch.randint(20, 4000, (1, 32))
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        return counter.get_total_flops()

    assert counted(quantization) == counted("none")


def test_the_bench_s_independent_count_is_per_token_of_the_sequence_that_ran():
    """--verify_flops counts one unpacked example, shorter than seq_length: FlopCounterMode's FLOPs per token of that
    example agree with ours for its length (dividing by seq_length put the tutorial recipe's count 234% off on
    2026-12-06)."""
    from datasets import Dataset

    from bench.recipes import flop_counter_per_token
    from finetune import modeling

    model = modeling.load_model("tiny-starcoder", modeling.quantization_config("8bit", torch.float32), torch.float32)
    model = modeling.add_lora(model, modeling.lora_config(4, 8, 0.0, "c_attn,c_proj"), True)
    ids = torch.randint(20, 4000, (37,)).tolist()  # of a 512-token recipe
    examples = Dataset.from_dict({"input_ids": [ids], "labels": [ids]})
    counted, ours = flop_counter_per_token(model, examples, modeling.load_tokenizer("tiny-starcoder"),
                                           dict(device_type="cpu", enabled=False))
    assert counted == pytest.approx(ours, rel=0.01)
    assert model.get_base_model().config._attn_implementation != "eager"  # the training attention is back


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_callback_rates_use_steps_after_warmup_and_non_padding_tokens():
    model = build("gpt_bigcode_multi_query", lora=True, checkpointing=False)
    clock = FakeClock()
    callback = TFLOPSCallback(warmup_steps=2, clock=clock)
    args, state, control = TrainingArguments(output_dir="unused", use_cpu=True), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model)
    step_seconds = [5.0, 3.0, 1.0, 2.0, 1.5]  # two warm-up steps, then 4.5 s measured
    lengths = [[SEQ, SEQ // 2], [SEQ, 8], [SEQ, SEQ // 4], [16, 16], [SEQ, 1]]
    for seconds, (first, second) in zip(step_seconds, lengths):
        callback.on_step_begin(args, state, control)
        mask = torch.zeros(2, SEQ, dtype=torch.long)
        mask[0, :first], mask[1, :second] = 1, 1
        ids = torch.randint(0, VOCAB, (2, SEQ))
        model(input_ids=ids, attention_mask=mask)
        clock.now += seconds
        callback.on_step_end(args, state, control)
        clock.now += 0.5  # outside the step: data loading, logging
    state.total_flos = 9e12
    metrics = callback.metrics(state)

    measured = lengths[2:]
    tokens = sum(a + b for a, b in measured)
    expected_flops = sum(n * flops_per_token(model, n).model for pair in measured for n in pair)
    assert metrics["tokens_per_second"] == pytest.approx(tokens / 4.5)
    assert metrics["samples_per_second"] == pytest.approx(6 / 4.5)
    assert metrics["model_tflops"] == pytest.approx(expected_flops / 4.5 / 1e12)
    assert metrics["warmup_seconds"] == pytest.approx(8.0)
    assert metrics["time_in_train_steps"] == pytest.approx(12.5)
    assert metrics["achieved_tflops"] == pytest.approx(9e12 / 12.5 / 1e12)  # the tutorial's metric, kept
    assert metrics["outside_steps_share"] == pytest.approx(1 - 4.5 / 5.5)  # two 0.5 s gaps in a 5.5 s window
    assert "mfu" not in metrics and "peak_memory_gib" not in metrics  # CPU: no peak, no GPU memory

    model.eval()
    model(input_ids=ids)  # evaluation forwards are not training tokens
    assert callback.metrics(state)["tokens_per_second"] == pytest.approx(tokens / 4.5)


def test_each_peak_table_row_matches_its_own_device_and_no_other(monkeypatch):
    import re

    from flops_counter import PEAK_TFLOPS

    monkeypatch.delenv("PEAK_TFLOPS", raising=False)
    for pattern, bf16, fp8, example in PEAK_TFLOPS:
        assert [row[0] for row in PEAK_TFLOPS if re.search(row[0], example)] == [pattern], example
        assert peak_tflops(example) == bf16 and peak_tflops(example, fp8=True) == fp8
    for lookalike in ("NVIDIA RTX A1000", "NVIDIA A10G", "NVIDIA L40 something-new", "NVIDIA H100 PCIe"):
        row = next((row for row in PEAK_TFLOPS if re.search(row[0], lookalike)), None)
        assert row is None or row[3].split()[-1] in lookalike, (lookalike, row)
    assert peak_tflops("NVIDIA L40") == 181.05 and peak_tflops("NVIDIA L4") == 121.0  # not L4's for an L40
    assert peak_tflops("NVIDIA RTX A1000") is None  # not the A100's


def test_achieved_tflops_after_a_resume_counts_this_process_only():
    model = build("gpt_bigcode_multi_query", lora=True, checkpointing=False)
    clock = FakeClock()
    callback = TFLOPSCallback(warmup_steps=0, clock=clock)
    args, control = TrainingArguments(output_dir="unused", use_cpu=True), TrainerControl()
    state = TrainerState(total_flos=7e15)  # the steps before the interruption
    callback.on_train_begin(args, state, control, model=model)
    callback.on_step_begin(args, state, control)
    clock.now += 2.0
    callback.on_step_end(args, state, control)
    state.total_flos += 4e12
    assert callback.metrics(state)["achieved_tflops"] == pytest.approx(4e12 / 2.0 / 1e12)
    callback.on_train_end(args, state, control)


def test_peak_table_override_and_unknown_devices(monkeypatch):
    monkeypatch.delenv("PEAK_TFLOPS", raising=False)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA H200") == 989.5
    assert peak_tflops("NVIDIA A10G") is None  # no datasheet: no guess
    assert peak_tflops("Some Future GPU") is None
    assert peak_tflops("Some Future GPU", override=123.0) == 123.0
    monkeypatch.setenv("PEAK_TFLOPS", "456")
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 456.0


def test_callback_metrics_reach_wandb_on_the_trainer_step_axis(tmp_path):
    args = tiny_args(tmp_path / "out", report_to="wandb", max_train_steps=6, logging_steps=2)
    trainer = base_with_tflops.main(args)
    rows = history(offline_runs(args.output_dir)[0])
    new_keys = ["train/model_tflops", "train/hardware_tflops", "train/tokens_per_second", "train/samples_per_second",
                "train/achieved_tflops", "train/time_in_train_steps"]
    logged = [row for row in rows if "train/loss" in row]
    assert [row["train/global_step"] for row in logged] == [2, 4, 6]
    for row in logged[1:]:  # the first logging step is still inside the two warm-up steps' shadow
        assert all(key in row for key in new_keys), row.keys()
        assert row["train/tokens_per_second"] > 0
    assert "tokens_per_second" in trainer.state.log_history[-1] or any(
        "tokens_per_second" in row for row in trainer.state.log_history)


def test_flops_counter_depends_only_on_torch_and_transformers():
    import ast

    tree = ast.parse((ROOT / "flops_counter.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"torch", "transformers"}
    done = subprocess.run([sys.executable, "-c", "import sys, flops_counter; assert 'finetune' not in sys.modules"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
