"""The StarCoder family as users have it, and its neighbours: StarCoder2 (grouped-query attention, rotary positions, a
sliding window), a Llama-architecture and a Qwen2 code model, each through every script on its embedded tiny model;
full-length context and the memory check."""

import dataclasses
import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import base_with_tflops
import generate
from conftest import tiny_args, train_counting_forwards
from finetune import architecture, attention, cli, memory, modeling
from finetune.cli import TrainArguments
from flops_counter import TFLOPSCallback, flops_per_token, span
from test_flops_counter import enable_checkpointing

FAMILIES = {"tiny-starcoder2": "starcoder2", "tiny-llama": "llama", "tiny-qwen2": "qwen2"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory):
    """A packed run with TFLOP/s on the family's tiny model."""
    out = tmp_path_factory.mktemp(request.param) / "out"
    args = tiny_args(out, model=request.param, packing=True, max_train_steps=4, eval_steps=4)
    trainer = base_with_tflops.main(args)
    return request.param, args, trainer


def test_each_family_trains_packed_with_its_default_lora_targets_and_reports_tflops(trained):
    name, args, trainer = trained
    targets = architecture.FAMILIES[FAMILIES[name]].lora_targets
    adapted = {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n, _ in trainer.model.named_modules() if n.endswith(
        ".lora_A")}
    assert adapted == set(targets), adapted  # every default target exists in the model, and only those are adapted
    assert all(row["loss"] > 0 for row in trainer.state.log_history if "loss" in row)
    logged = [row for row in trainer.state.log_history if "model_tflops" in row]
    assert logged and all(row["model_tflops"] > 0 for row in logged)


def test_each_family_generates_evaluates_and_merges(trained, tmp_path):
    name, args, _ = trained
    options = generate.GenerateArguments(adapter=args.output_dir, quantization="none", prompt=["Add one to x."],
                                         max_new_tokens=4, evaluate=True, max_eval_samples=4)
    results = generate.main(options)
    assert len(results["completions"]) == 1 and results["evaluation"]["adapter_loss"] > 0
    merged = generate.main(generate.GenerateArguments(adapter=args.output_dir, merge=True,
                                                      merged_dir=str(tmp_path / "merged")))
    reloaded = modeling.load_quantized(str(tmp_path / "merged"), "none").eval()
    ids = torch.randint(5, 4000, (1, 12))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, merged.eval()(input_ids=ids).logits, atol=1e-5)
    assert type(reloaded).__name__.lower().startswith(FAMILIES[name].replace("_", ""))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_trains_padded(tmp_path, name):
    trainer = base_with_tflops.main(tiny_args(tmp_path / "out", model=name, max_train_steps=2, eval_steps=2))
    assert "position_ids" not in trainer.train_dataset.column_names
    assert trainer.state.global_step == 2


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_packed_example_sees_only_itself_in_every_family(name):
    model = modeling.load_quantized(name, "none").eval()
    if name == "tiny-starcoder2":
        model.config.sliding_window = 16  # shorter than the example and the block: the window must apply
    attention.use(model)
    first, second = torch.randint(5, 4000, (1, 20)), torch.randint(5, 4000, (1, 40))
    block = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(20), torch.arange(40)])[None]
    with torch.no_grad():
        together = model(input_ids=block, position_ids=positions).logits[0, 20:]
        alone = model(input_ids=second).logits[0]
        assert torch.allclose(together, alone, atol=1e-4), (together - alone).abs().max()
        if name == "tiny-starcoder2":
            model.config.sliding_window = None
            assert not torch.allclose(model(input_ids=second).logits[0], alone, atol=1e-3), "the window is applied"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length FlashAttention kernel needs a GPU")
def test_packed_starcoder2_on_the_gpu_kernel_keeps_examples_apart_within_the_window():
    from finetune import data

    model = modeling.load_quantized("tiny-starcoder2", "none").eval().to(torch.bfloat16)
    model.config.sliding_window = 16
    attention.use(model)
    assert attention.flash_available()
    first, second = torch.randint(5, 4000, (20,)).tolist(), torch.randint(5, 4000, (40,)).tolist()
    features = [{"input_ids": first + second, "labels": first + second,
                 "position_ids": list(range(20)) + list(range(40))}]
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in data.Collator(None)(features).items()}
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch).logits[0, 20:].float()
        alone = model(input_ids=torch.tensor([second], device="cuda")).logits[0].float()  # SDPA with the window
    assert torch.allclose(packed, alone, atol=0.05, rtol=0.05), (packed - alone).abs().max()


CONFIGS = {name: architecture.config(family, "tiny", vocab_size=256, num_hidden_layers=2)
           for family, name in [("starcoder2", "starcoder2"), ("llama", "llama"), ("qwen2", "qwen2")]}


@pytest.mark.parametrize("name,checkpointing", list(itertools.product(CONFIGS, [False, True])))
def test_flops_count_matches_flop_counter_mode_for_each_family(name, checkpointing):
    model = with_lora(CONFIGS[name])
    if checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()
    model.train()
    seq = 32
    ids = torch.randint(0, 256, (2, seq))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    ours = flops_per_token(model, seq, gradient_checkpointing=checkpointing)
    attention_flops = ours.breakdown["attention_forward"] + ours.breakdown["attention_backward"]
    recomputed = ours.breakdown["attention_forward"] if checkpointing else 0.0  # FlopCounterMode: full attention
    assert counter.get_total_flops() / (2 * seq) == pytest.approx(ours.hardware + attention_flops + recomputed,
                                                                  rel=0.01)


def with_lora(config):
    """The config's model with random weights, eager attention (FlopCounterMode counts its matmuls) and LoRA on the
    family's default targets."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return get_peft_model(model, modeling.lora_config(4, 8, 0.0, ",".join(modeling.lora_targets(config, None))))


def test_a_sliding_window_is_charged_by_the_positions_each_token_sees():
    seq, window = 64, 16
    config = architecture.config("starcoder2", "tiny", vocab_size=256, num_hidden_layers=2, sliding_window=window)
    model = with_lora(config).eval()
    with torch.no_grad():
        probabilities = model(input_ids=torch.randint(0, 256, (1, seq)), output_attentions=True).attentions[0]
    seen = (probabilities[0, 0] > 0).sum(dim=-1)  # the positions each query actually attends to
    assert seen.tolist() == [min(p + 1, window) for p in range(seq)]
    assert span(seq, window) * seq == 2 * seen.sum().item() - seq  # the diagonal counts half, as causal attention
    windowed = flops_per_token(model, seq)
    config.sliding_window = None
    unwindowed = flops_per_token(model, seq)
    for part in ("attention_forward", "attention_backward"):
        assert windowed.breakdown[part] == pytest.approx(unwindowed.breakdown[part] * span(seq, window) / seq)
    assert windowed.breakdown["linear_forward"] == unwindowed.breakdown["linear_forward"]
    assert windowed.model < unwindowed.model


def test_the_callback_charges_packed_examples_by_their_window():
    model = modeling.load_quantized("tiny-starcoder2", "none")  # its window: 256 positions
    model.config.sliding_window = 16
    callback = TFLOPSCallback(warmup_steps=0)
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args, state = TrainingArguments(output_dir="unused", use_cpu=True), TrainerState()
    callback.on_train_begin(args, state, TrainerControl(), model=model)
    model.train()
    positions = torch.cat([torch.arange(20), torch.arange(40)])[None]
    with torch.no_grad():
        model(input_ids=torch.zeros_like(positions), position_ids=positions)
    callback.on_train_end(args, state, TrainerControl())
    tokens, examples, spans = callback.counts.tolist()
    assert (tokens, examples) == (60, 2) and callback.windows == [16]
    assert spans == pytest.approx(span(20, 16) * 20 + span(40, 16) * 40)
    expected = sum(n * flops_per_token(model, n).model for n in (20, 40))
    assert callback.flops_of(tokens, [spans])[0] == pytest.approx(expected)


def test_seq_length_at_the_models_limit_trains_and_one_past_it_is_refused(tmp_path, capsys):
    trainer = base_with_tflops.main(tiny_args(tmp_path / "out", model="tiny-starcoder2", seq_length=1024,
                                              packing=True, batch_size=1, max_train_steps=1, eval_steps=1,
                                              max_eval_samples=2))
    assert len(trainer.train_dataset[0]["input_ids"]) == 1024
    with pytest.raises(SystemExit) as exit_info:
        cli.run(base_with_tflops.main, TrainArguments, argv=["--model", "tiny-starcoder2", "--dataset", "stdlib-code",
                                                             "--seq_length", "1025", "--output_dir",
                                                             str(tmp_path / "past")])
    assert exit_info.value.code == 2
    assert "--seq_length 1025 is above 'tiny-starcoder2''s maximum of 1024 positions" in capsys.readouterr().err


def test_the_memory_estimate_names_what_would_fit(monkeypatch):
    monkeypatch.setattr(memory, "device_gib", lambda: 79.6)  # an 80 GB card: there is no GPU here
    config = architecture.config("starcoder2", "15b")
    targets = modeling.lora_targets(config, None)
    long = TrainArguments(model="tiny-starcoder2", quantization="4bit", batch_size=1, seq_length=16384,
                          packing=True)
    with pytest.raises(cli.UsageError) as refused:
        memory.check(long, config, targets)
    message = str(refused.value)
    assert "needs about 87 GiB" in message and "the GPU has 80 GiB" in message
    assert "this would fit: set --gradient_checkpointing (about" in message and "--check_memory false" in message
    checkpointed = TrainArguments(model="tiny-starcoder2", batch_size=1, seq_length=16384, packing=True,
                                  gradient_checkpointing=True)
    assert memory.check(checkpointed, config, targets)["total"] < 40
    short = TrainArguments(model="tiny-starcoder2", batch_size=4, seq_length=2048, packing=True)
    assert memory.check(short, config, targets)["total"] < 79.6


def test_a_16_gb_run_short_of_memory_is_told_to_offload_its_checkpointed_layers_inputs(monkeypatch):
    """StarCoder-15B at 2 x 2,048 with every layer checkpointed and the checkpoints on the GPU needs about 13 GiB: on a
    card with 11.5 GiB the check names --offload_layer_inputs, with which --recipe lean_fp8 fits there."""
    monkeypatch.setattr(memory, "device_gib", lambda: 11.5)
    config = architecture.config("gpt_bigcode", "15b")
    targets = modeling.lora_targets(config, None)
    recipe = TrainArguments(model="tiny-starcoder", dtype="bfloat16", **{**cli.RECIPES["lean_fp8"],
                                                                          "checkpointed_layers": "all"})
    with pytest.raises(cli.UsageError, match=r"this would fit: set --offload_layer_inputs \(about 12 GiB\)"):
        memory.check(dataclasses.replace(recipe, offload_layer_inputs=False), config, targets)
    assert memory.check(recipe, config, targets)["total"] <= 11.5
    with pytest.raises(cli.UsageError) as refused:  # compiled layers refuse the offload: it is no way out for them
        memory.check(dataclasses.replace(recipe, offload_layer_inputs=False, compile_layers=True), config, targets)
    assert "this run needs about" in str(refused.value) and "offload" not in str(refused.value)


EVERY_RECIPE = {"qlora", "tutorial", "fp8", "fp8_lean", "fast", "bf16"}


@pytest.mark.parametrize("measured,recipes", [("h100-recipes-every-2026-12-07-afternoon.json", EVERY_RECIPE),
                                              ("h100-recipes-offloaded-inputs-2026-12-07.json", EVERY_RECIPE),
                                              ("h100-lean-cap16-offloaded-inputs-2026-12-07.json", {"lean", "lean_b1"})])
def test_the_memory_estimate_is_just_above_every_recipes_measured_peak(measured, recipes):
    """Each recipe's estimate, from the settings it ran with, against the peak it reached on a GPU in a table of
    every recipe (docs/PERFORMANCE.md): never below it, where a card it does not fit would be let through, and within
    1.5 GiB above it. The qlora and tutorial recipes keep a 16-bit copy of each adapted fp32 input under autocast and
    a dropout mask: without those the estimate was 1.6 and 1.9 GiB short."""
    import json
    from pathlib import Path

    table = json.loads((Path(__file__).parents[1] / "docs/bench" / measured).read_text())
    config = architecture.config("gpt_bigcode", "15b")
    shape = memory.shape_of(config, 16, modeling.lora_targets(config, None))
    settings = {field.name for field in dataclasses.fields(TrainArguments)} - {"checkpointed_layers"}  # a count there
    for run in table["results"]:
        # the settings each run recorded, as the recipe of that name then was; the GPU's dtype where the recipe leaves
        # it to the machine ("auto": fp32 on this CPU)
        args = TrainArguments(model="tiny-starcoder", **{"dtype": "bfloat16",
                                                          **{k: v for k, v in run.items() if k in settings}})
        estimate = memory.estimate(shape, **memory.settings(args, run["checkpointed_layers"], run["recompute_gelu"]))
        assert 0 <= estimate["total"] - run["peak_memory_gib"] <= 1.5, (run["recipe"], estimate, run["peak_memory_gib"])
    assert {run["recipe"] for run in table["results"]} >= recipes


def gelu_recomputed(args, config, targets) -> bool:
    return memory.plan(args, config, targets)[1]


def test_the_gelu_is_recomputed_only_where_a_run_needs_the_memory(monkeypatch):
    """On an 80 GB card StarCoder-15B with a bf16 base at 4 x 2,048 (--recipe bf16) fits only with the MLP's GELU
    recomputed (its output, the adapted c_proj's input, not kept: 15 GiB); FP8 at 4 x 2,048 fits without, and keeps
    the faster step; StarCoder2's down projection is not adapted by default, so it has nothing to recompute; nor does
    the CPU."""
    monkeypatch.setattr(memory, "device_gib", lambda: 79.6)
    starcoder, starcoder2 = (architecture.config(family, "15b") for family in ("gpt_bigcode", "starcoder2"))
    bf16 = TrainArguments(model="tiny-starcoder", recipe="bf16", **cli.RECIPES["bf16"])
    needed = gelu_recomputed(bf16, starcoder, modeling.lora_targets(starcoder, None))
    assert needed and memory.check(bf16, starcoder, modeling.lora_targets(starcoder, None))["total"] < 79.6
    classic = dataclasses.replace(bf16, recipe="qlora", **cli.RECIPES["qlora"])  # autocast: peft's path, no recompute
    assert not gelu_recomputed(classic, starcoder, modeling.lora_targets(starcoder, None))
    fp8_run = dataclasses.replace(bf16, quantization="fp8")
    assert not gelu_recomputed(fp8_run, starcoder, modeling.lora_targets(starcoder, None))
    six = dataclasses.replace(fp8_run, batch_size=6)
    assert gelu_recomputed(six, starcoder, modeling.lora_targets(starcoder, None))
    assert not gelu_recomputed(dataclasses.replace(six, model="tiny-starcoder2"), starcoder2,
                               modeling.lora_targets(starcoder2, None))
    monkeypatch.setattr(memory, "device_gib", lambda: None)
    assert not gelu_recomputed(bf16, starcoder, modeling.lora_targets(starcoder, None))


def test_the_24_gb_recipe_fits_starcoder_15b_with_room_to_spare():
    """--recipe fp8_lean is for 24 GB cards: its estimate for StarCoder-15B stays at 22 GiB or under, loading
    included (the FP8 base is staged on the CPU: no 29 GiB bf16 copy on the GPU)."""
    config = architecture.config("gpt_bigcode", "15b")
    shape = memory.shape_of(config, 16, modeling.lora_targets(config, None))
    recipe = cli.RECIPES["fp8_lean"]
    estimate = memory.estimate(shape, recipe["quantization"], recipe["batch_size"], recipe["seq_length"],
                               shape.layers)
    assert 15 < estimate["weights"] < 16 and estimate["total"] <= 22, estimate
    doubled = memory.estimate(shape, "fp8", 2 * recipe["batch_size"], recipe["seq_length"], shape.layers)
    assert doubled["total"] > 22  # the batch is as large as the card allows


@pytest.mark.parametrize("recipe,card_gib", [("fp8_lean", 24.0), ("fp8_lean", 22.5), ("lean", 16.0)])
def test_the_lean_recipes_checkpoint_the_fewest_layers_that_fit(monkeypatch, recipe, card_gib):
    """--checkpointed_layers fit (the lean recipes): on StarCoder-15B, the first n layers checkpointed where n is the
    fewest whose estimate fits the card, with the GELU recomputed where that makes n smaller; every layer on the CPU;
    none where the run fits without; all where nothing else fits; a count above the model's layers refused."""
    config = architecture.config("gpt_bigcode", "15b")
    targets = modeling.lora_targets(config, None)
    shape = memory.shape_of(config, 16, targets)
    args = TrainArguments(model="tiny-starcoder", recipe=recipe, **cli.RECIPES[recipe])
    monkeypatch.setattr(memory, "device_gib", lambda: card_gib)
    checkpointed, recompute_gelu = memory.plan(args, config, targets)

    def total(layers, recompute=recompute_gelu):
        return memory.estimate(shape, **memory.settings(args, layers, recompute))["total"]

    budget = card_gib - memory.FIT_MARGIN_GIB  # room for a display or another process
    assert 0 < checkpointed < shape.layers and total(checkpointed) <= budget < total(checkpointed - 1)
    kept_gelu = next(n for n in range(shape.layers + 1) if total(n, False) <= budget)
    assert recompute_gelu and checkpointed < kept_gelu  # the recompute buys layers
    every = dataclasses.replace(args, checkpointed_layers="all")
    assert memory.plan(every, config, targets) == (shape.layers, False)  # fits with the GELU kept
    assert memory.plan(dataclasses.replace(args, checkpointed_layers="7"), config, targets)[0] == 7
    with pytest.raises(cli.UsageError, match="--checkpointed_layers 41 is more than the model's 40 decoder layers"):
        memory.check(dataclasses.replace(args, checkpointed_layers="41"), config, targets)
    monkeypatch.setattr(memory, "device_gib", lambda: 141.0)  # an H200: nothing to checkpoint
    assert memory.plan(args, config, targets) == (0, False)
    monkeypatch.setattr(memory, "device_gib", lambda: 12.0)  # short of even every layer: all, and the check refuses
    assert memory.plan(args, config, targets)[0] == shape.layers
    monkeypatch.setattr(memory, "device_gib", lambda: None)
    assert memory.plan(args, config, targets) == (shape.layers, False)


def test_a_run_short_of_memory_checkpoints_only_its_first_layers_and_learns_the_same(tmp_path, monkeypatch, capsys):
    """--checkpointed_layers fit on a GPU that holds the run with some of its layers checkpointed: the pipeline leaves
    checkpointing on in the first ones only, which run their forward twice in a training step and the others once,
    and the losses are those of the run with every layer checkpointed."""

    def train(name, checkpointed_layers):
        return train_counting_forwards(tiny_args(tmp_path / name, max_train_steps=2, eval_steps=2,
                                                 gradient_checkpointing=True, checkpointed_layers=checkpointed_layers))

    config = modeling.check_model("tiny-starcoder", 64, None)
    shape = memory.shape_of(config, 16, ["c_attn", "c_proj"])
    none, every = (memory.estimate(shape, "4bit", 4, 64, layers)["total"] for layers in (0, shape.layers))
    monkeypatch.setattr(memory, "device_gib", lambda: (none + every) / 2 + memory.FIT_MARGIN_GIB)
    fitted, calls, losses = train("fit", "fit")
    first, once = sum(fitted), calls[-1]  # once: the training forwards and the evaluations
    assert 0 < first < shape.layers and fitted == [True] * first + [False] * (shape.layers - first)
    assert f"activation checkpointing in {first} of {shape.layers} decoder layers" in capsys.readouterr().out
    assert calls == [once + 2] * first + [once] * (shape.layers - first)  # again in each of the 2 steps
    all_checkpointed, calls, all_losses = train("all", "all")
    assert all(all_checkpointed) and calls == [once + 2] * shape.layers
    assert len(losses) == 2 and losses == pytest.approx(all_losses, rel=1e-5)


def test_a_run_that_cannot_fit_is_refused_before_anything_loads_or_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "device_gib", lambda: 2.0)
    argv = ["--model", "tiny-starcoder", "--dataset", "stdlib-code", "--seq_length", "1024", "--batch_size", "512",
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cli.run(base_with_tflops.main, TrainArguments, argv=argv)
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: this run needs about ") and "--batch_size 1" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the variable-length FlashAttention kernel needs a GPU")
@pytest.mark.parametrize("window", [None, 512])
def test_packed_flash_attention_is_torchs_varlen_attention(window):
    """Our direct call of the kernels gives what torch.nn.attention.varlen.varlen_attn gives, forward and backward
    (the query gradient within the kernel's own run-to-run spread: it sums with atomics)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    lengths = [300, 80, 600, 1068, 2048, 500]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(sum(lengths), heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for heads in (48, 1, 1))
    grad = torch.randn_like(q)
    left = window - 1 if window else -1
    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}
    expected = varlen_attn(q, k, v, cu, cu, max(lengths), max(lengths), scale=0.1, window_size=(left, 0), **gqa)
    ours = attention._PackedFlashAttention.apply(q, k, v, cu, max(lengths), 0.1, left)
    assert torch.equal(ours, expected)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    torch.testing.assert_close(ours_grads[0], expected_grads[0], atol=1e-2, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(ours_grads[1:], expected_grads[1:]))
