"""The fused paths (finetune/fusion.py) compute what peft's unfused layers compute, fall back to them where they do
not apply, and store nothing twice."""

import pytest
import torch

from conftest import on_triton_interpreter, spy
import flops_counter
from finetune import fp8, fusion, modeling
from test_fp8 import needs_fp8_on_device, needs_scaled_mm


def lora_model(name: str, targets: str, dtype=torch.float32, base_in_fp8=False, quantization=None, **load_kwargs):
    torch.manual_seed(0)
    model = modeling.add_lora(modeling.load_model(name, quantization, dtype, **load_kwargs),
                              modeling.lora_config(r=4, alpha=8, dropout=0.0, targets=targets))
    for n, p in model.named_parameters():  # B starts at zero: give the adapter something to add
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    if base_in_fp8:
        fp8.convert(model)
    return model


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("recompute_gelu", [False, True])
@pytest.mark.parametrize("name,targets,layers", [("tiny-starcoder", "c_attn,c_proj", 3 * 4),  # c_proj twice a block
                                                 ("tiny-starcoder2", "q_proj,k_proj,v_proj,o_proj", 4 * 4)])
def test_fused_lora_layers_give_peft_s_loss_and_gradients(name, targets, layers, recompute_gelu):
    model = lora_model(name, targets)
    ids = torch.randint(20, 4000, (2, 24))
    unfused = loss_and_grads(model, ids)
    assert fusion.fuse_lora(model, recompute_gelu) == layers
    fused = loss_and_grads(model, ids)
    assert fused[0] == pytest.approx(unfused[0], rel=1e-6)
    assert fused[1].keys() == unfused[1].keys() and all(
        torch.allclose(fused[1][n], unfused[1][n], rtol=1e-4, atol=1e-6) for n in unfused[1])


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_fused_layers_over_bitsandbytes_bases_give_peft_s_loss_and_gradients(quantization):
    """4-bit bases take the one-function path (the base unpacked for its input gradient), 8-bit ones the addmm one;
    both with the MLP's GELU moved into the down projection."""
    model = lora_model("tiny-starcoder", "c_attn,c_proj", torch.bfloat16,
                       quantization=modeling.quantization_config(quantization, torch.bfloat16))
    ids = torch.randint(20, 4000, (2, 24))
    unfused = loss_and_grads(model, ids)
    fusion.fuse_lora(model, recompute_gelu=True)
    fused = loss_and_grads(model, ids)
    assert fused[0] == pytest.approx(unfused[0], rel=1e-2)  # bf16: the same sums in another order
    assert fused[1].keys() == unfused[1].keys()
    assert max(relative_error(fused[1][n], unfused[1][n]) for n in unfused[1]) < 0.02


@needs_scaled_mm
def test_a_4_bit_base_multiplied_in_fp8_gives_the_bf16_loss_within_e4m3_rounding_and_keeps_no_fp8_copy(monkeypatch):
    """--fp8_matmuls: each 4-bit layer's NF4 weight, adapted (the fused path) or not (c_fc), becomes e4m3 in its
    forward and again in its backward, and nothing in FP8 is kept between them."""
    model = lora_model("tiny-starcoder", "c_attn,c_proj", torch.bfloat16,
                       quantization=modeling.quantization_config("4bit", torch.bfloat16))
    ids = torch.randint(20, 4000, (2, 24))
    fusion.fuse_lora(model)
    in_bf16, kept_in_bf16 = loss_and_grads(model, ids), saved_bytes(model, ids)
    made = spy(monkeypatch, fp8, "from_4bit")
    assert fp8.multiply_4bit_in_fp8(model) == 4 * 4  # c_attn, c_proj, c_fc, c_proj in 4 blocks; the head is 16-bit
    fusion.fuse_lora(model)
    in_fp8 = loss_and_grads(model, ids)
    # forward and backward of each, but the first block's c_attn computes no input gradient (the embeddings' are
    # frozen)
    assert len(made) == 2 * 4 * 4 - 1
    assert in_fp8[0] != in_bf16[0] and in_fp8[0] == pytest.approx(in_bf16[0], rel=0.02)
    assert in_fp8[1].keys() == in_bf16[1].keys()
    # each e4m3 rounding is about 2^-4 relative; the first blocks' gradients pass back through up to 12 FP8 GEMMs
    errors = sorted(relative_error(in_fp8[1][n], in_bf16[1][n]) for n in in_bf16[1])
    assert errors[len(errors) // 2] < 0.06 and errors[-1] < 0.2, errors
    row_scales = sum(m.fp8_row_scales.nbytes for m in model.modules() if hasattr(m, "fp8_row_scales"))
    assert saved_bytes(model, ids) == kept_in_bf16 + row_scales  # the layers' row scales, and nothing in e4m3


def saved_bytes(model, ids) -> int:
    """Bytes of the activations autograd keeps from forward to backward (each storage once, the model's own
    parameters left out)."""
    storages = {}
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def test_an_adapted_down_projection_applies_its_gelu_and_recomputes_its_output_where_asked():
    """The GELU moves into the down projection (on a GPU into the pass that quantizes its output for an FP8 base);
    the GELU's output is kept once, as before, or with `recompute_gelu` not at all."""
    ids = torch.randint(20, 4000, (2, 24))
    keep, recompute = (lora_model("tiny-starcoder", "c_attn,c_proj", torch.bfloat16) for _ in range(2))
    with torch.no_grad(), keep.disable_adapter():
        base_logits = keep(input_ids=ids).logits
    before = saved_bytes(keep, ids)
    fusion.fuse_lora(keep)
    fusion.fuse_lora(recompute, recompute_gelu=True)
    for model, kind in ((keep, "keep"), (recompute, "recompute")):
        mlp = model.get_base_model().transformer.h[0].mlp
        assert isinstance(mlp.act, torch.nn.Identity) and mlp.c_proj._gelu_input == kind
    assert not fusion.recomputes_gelu(keep) and fusion.recomputes_gelu(recompute)
    config = keep.config
    gelu_outputs = ids.numel() * config.n_inner * config.n_layer * 2  # bf16
    scaled_b = sum(p.numel() * 2 for n, p in keep.named_parameters() if "lora_B" in n)  # B x scale, kept instead
    assert saved_bytes(keep, ids) <= before + scaled_b
    assert before - saved_bytes(recompute, ids) >= gelu_outputs - scaled_b
    with torch.no_grad(), keep.disable_adapter():  # peft's own path applies the moved GELU too
        assert torch.equal(keep(input_ids=ids).logits, base_logits)


def test_autocast_and_dropout_take_peft_s_path_with_the_same_result(monkeypatch):
    """Under autocast (the classic recipe) the one-function path would not repeat autocast's casts in its backward,
    and with dropout LoRA's input differs from the base's: both keep peft's path, GELU and all."""
    monkeypatch.setattr(fusion._LoraLinear, "apply", lambda *args: pytest.fail("the one-function path ran"))
    ids = torch.randint(20, 4000, (2, 24))
    for settings in (dict(dropout=0.0, autocast=True), dict(dropout=0.1, autocast=False)):
        torch.manual_seed(0)
        model = modeling.add_lora(modeling.load_model("tiny-starcoder", None, torch.float32),
                                  modeling.lora_config(r=4, alpha=8, dropout=settings["dropout"],
                                                       targets="c_attn,c_proj"))
        model.eval()  # dropout off, so both runs compute the same
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings["autocast"]):
            unfused = loss_and_grads(model, ids)
            fusion.fuse_lora(model, recompute_gelu=True)
            fused = loss_and_grads(model, ids)
        assert fused[0] == pytest.approx(unfused[0], rel=1e-6)
        assert all(torch.allclose(fused[1][n], unfused[1][n], rtol=1e-4, atol=1e-6) for n in unfused[1])


_ADAPTED_MLP = [("tiny-starcoder", "c_attn,c_proj"), ("tiny-starcoder2", "q_proj,k_proj,v_proj,o_proj,c_fc,c_proj")]
_FROZEN_MLP = ("tiny-starcoder2", "q_proj,k_proj,v_proj,o_proj")  # StarCoder2's default targets


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name,targets,base", [
    pytest.param(*model, base, marks=[needs_fp8_on_device] if "fp8" in base else [])
    for model, bases in [*[(model, ("bf16", "4bit", "fp8")) for model in _ADAPTED_MLP],
                         (_FROZEN_MLP, ("bf16", "4bit", "fp8", "4bit_in_fp8"))]
    for base in bases])
def test_a_checkpointed_layer_s_recompute_skips_its_down_projection_and_learns_the_same(name, targets, base,
                                                                                        reentrant):
    """skip_unread: in each layer's recompute the MLP's down projection, adapted or frozen (any base), runs no GEMM, in
    training mode (the residual dropout after it draws its mask again, from no values) under both kinds of
    checkpointing; the losses and gradients are the same, and flops_counter's hardware FLOPs drop by that GEMM (and
    LoRA's B), as FlopCounterMode's do."""
    from torch.utils.flop_counter import FlopCounterMode
    from test_flops_counter import enable_checkpointing

    ids = torch.randint(20, 4000, (2, 24))
    runs = []
    for skip in (False, True):
        # eager attention: FlopCounterMode's SDPA rule fails on multi-query shapes on some torch versions
        quantization = modeling.quantization_config("4bit", torch.bfloat16) if "4bit" in base else None
        model = lora_model(name, targets, torch.bfloat16, base_in_fp8=base == "fp8", quantization=quantization,
                           attn_implementation="eager")
        if base == "4bit_in_fp8":
            fp8.multiply_4bit_in_fp8(model)
        if reentrant:
            enable_checkpointing(model)
            model.enable_input_require_grads()
        else:  # non-reentrant, by transformers' new name where it has one
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()
        fusion.fuse_lora(model, skip_unread=skip)
        fusion.fuse_lora(model, skip_unread=skip)  # once per layer however often it runs
        torch.manual_seed(1)
        with FlopCounterMode(display=False) as counter:
            loss, grads = loss_and_grads(model, ids.to(model.device))
        hardware = flops_counter.flops_per_token(model, ids.shape[1], gradient_checkpointing=None).hardware
        runs.append((loss, grads, counter.get_total_flops() / ids.numel(), hardware))
    (loss, grads, measured, hardware), (skip_loss, skip_grads, skip_measured, skip_hardware) = runs
    assert skip_loss == loss and skip_grads.keys() == grads.keys()
    # a GPU's attention backward sums in any order, and its FP8 base's first pass takes the GELU from a Triton kernel
    tolerance = 0.02 if torch.cuda.is_available() else 0.0
    assert max(relative_error(skip_grads[n], grads[n]) for n in grads) <= tolerance
    layers = model.config.num_hidden_layers
    blocks = model.get_base_model().model.layers if name.endswith("2") else model.get_base_model().transformer.h
    down = blocks[0].mlp.c_proj
    base_layer, lora_b = (down.base_layer, down.lora_B["default"]) if hasattr(down, "lora_B") else (down, None)
    skipped = 2 * base_layer.in_features * base_layer.out_features * layers
    # FlopCounterMode misses LoRA's in-place add, and bitsandbytes' gemm_4bit op, in which its own frozen 4-bit layer
    # multiplies: without the skip only that layer's backward is counted, with it (fp8.frozen_matmul) its forward too
    hidden = skipped if base == "4bit" and lora_b is None else 0
    assert measured - skip_measured == pytest.approx(skipped - 2 * hidden, rel=1e-6)
    lora_skipped = 2 * lora_b.in_features * lora_b.out_features * layers if lora_b is not None else 0
    assert hardware - skip_hardware == pytest.approx(skipped + lora_skipped, rel=1e-6)


@needs_scaled_mm
@pytest.mark.parametrize("name,groups", [("tiny-starcoder2", 1), ("tiny-llama", 2)])
def test_siblings_over_an_fp8_base_share_one_computation_with_the_same_result(name, groups):
    targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    model = lora_model(name, targets, torch.bfloat16, base_in_fp8=True)
    ids = torch.randint(20, 4000, (2, 24))
    reference = loss_and_grads(lora_model(name, targets, torch.bfloat16), ids)  # no FP8 anywhere
    unfused = loss_and_grads(model, ids)
    calls = []
    original = fp8.forward_rows
    fusion.fuse_lora(model)
    fp8.forward_rows = lambda x, weight, *rest: calls.append(weight.shape[0]) or original(x, weight, *rest)
    try:
        fused = loss_and_grads(model, ids)
    finally:
        fp8.forward_rows = original
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    query, key_value = config.hidden_size, config.num_key_value_heads * head_dim
    assert calls.count(query + 2 * key_value) == config.num_hidden_layers  # q, k and v: one GEMM a block
    assert key_value not in calls  # k and v never alone
    if groups == 2:
        assert calls.count(2 * config.intermediate_size) == config.num_hidden_layers  # gate and up: one GEMM
        assert config.intermediate_size not in calls
    # The forward is the same arithmetic. The backward quantizes the siblings' stacked output gradient with one scale
    # per row (e4m3 is floating point: a scale sets the range, not the relative precision), so the gradients are
    # as far from those of a bf16 base as the unfused FP8 layers' are.
    assert fused[0] == pytest.approx(unfused[0], rel=1e-3)
    assert fused[1].keys() == unfused[1].keys() == reference[1].keys()
    error = {way: sum(relative_error(grads[n], reference[1][n]) for n in grads) / len(grads)
             for way, (_, grads) in (("unfused", unfused), ("fused", fused))}
    assert error["fused"] < 1.1 * error["unfused"], error


@needs_scaled_mm
def test_siblings_store_nothing_twice_and_each_layer_still_works_alone():
    model = lora_model("tiny-starcoder2", "q_proj,k_proj,v_proj,o_proj", torch.bfloat16, base_in_fp8=True)
    ids = torch.randint(20, 4000, (2, 24))
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    fusion.fuse_lora(model)
    attention = model.get_base_model().model.layers[0].self_attn
    shared = attention.q_proj._siblings.weight
    for layer in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert layer.base_layer.weight.untyped_storage().data_ptr() == shared.untyped_storage().data_ptr()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == before
    with torch.no_grad(), model.disable_adapter():  # peft's own path, through each layer's view of the weights
        assert torch.equal(model(input_ids=ids).logits, base_logits)


@needs_scaled_mm
@pytest.mark.parametrize("name,targets", [("tiny-starcoder2", "q_proj,k_proj,v_proj,o_proj"),
                                          ("tiny-starcoder", "c_attn,c_proj")])
def test_fused_layers_compile_inside_a_decoder_layer_without_a_graph_break(name, targets):
    """--compile_layers compiles each decoder layer around the fused computations (the siblings' shared one; the down
    projection with its recomputed GELU): it traces whole (the aot_eager backend stands in for the GPU's inductor)
    and computes the same."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = lora_model(name, targets, torch.bfloat16, base_in_fp8=True)
    fusion.fuse_lora(model, recompute_gelu=True)
    ids = torch.randint(20, 4000, (2, 24))
    eager = loss_and_grads(model, ids)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        layer.compile(backend="aot_eager")
    compiled = loss_and_grads(model, ids)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert compiled[0] == eager[0]
    assert all(torch.equal(compiled[1][n], eager[1][n]) for n in eager[1])


def test_a_run_short_of_memory_recomputes_the_gelu_and_trains(tmp_path, monkeypatch):
    """The training pipeline asks finetune/memory.py: with a GPU that holds the run only without the GELU's output,
    the down projections recompute it, and the run trains."""
    from conftest import tiny_args
    from finetune import memory, pipeline, training

    args = tiny_args(tmp_path, max_train_steps=2, eval_steps=2)
    shape = memory.shape_of(modeling.check_model(args.model, args.seq_length, None), args.lora_r, ["c_attn", "c_proj"])
    keep, recompute = (memory.estimate(shape, args.quantization, args.batch_size, args.seq_length, 0,
                                       recompute_gelu=choice)["total"] for choice in (False, True))
    monkeypatch.setattr(memory, "device_gib", lambda: (keep + recompute) / 2)
    run = pipeline.prepare(args)
    mlp = run.model.get_base_model().transformer.h[0].mlp
    assert isinstance(mlp.act, torch.nn.Identity) and mlp.c_proj._gelu_input
    trainer = training.build_trainer(args, run)
    training.train(trainer, args, run)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_checkpointed_run_on_the_fused_path_skips_the_down_projections_in_the_recompute(tmp_path, monkeypatch,
                                                                                          compiled):
    """The pipeline turns skip_unread on where the layers take the one-function path: a training step runs each
    block's three adapted layers (c_attn and both c_proj) forward and again in the recompute, less the MLP's c_proj.
    Not with --compile_layers: dynamo traces the checkpoint, recompute and all."""
    from conftest import tiny_args
    from finetune import pipeline

    model = pipeline.prepare(tiny_args(tmp_path, gradient_checkpointing=True, compile_layers=compiled)).model.train()
    layers = modeling.decoder_layers(model)
    assert [getattr(layer, "_skips_unread", False) for layer in layers] == [not compiled] * len(layers)
    if compiled:  # on a GPU the layers compile, and the spy below would count the traces
        return
    base_forwards = spy(monkeypatch, fusion, "_base_forward")
    ids = torch.randint(20, 4000, (2, 24), device=model.device)
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(base_forwards) == 3 * len(layers) * 2 - len(layers)


# LoRA's low-rank add as the GPU runs it (finetune/lora_kernels.py), on Triton's CPU interpreter: rows and columns
# that do not fill a tile, ranks below, at and above the 16 of a tile, B^T as the forward passes it (a transposed
# view) and A as the backward does (contiguous), and a `down` in either layout. The interpreter's cast to bf16
# truncates where the GPU's rounds to nearest, so each sum is checked against the exact one truncated (and within
# one bf16 step of it).
_LOW_RANK_ADD_ON_THE_INTERPRETER = """
import torch
from finetune import lora_kernels

torch.manual_seed(0)
for rows, columns, rank in ((70, 300, 16), (130, 520, 8), (64, 256, 32)):
    out = torch.randn(rows, columns).to(torch.bfloat16)
    down = torch.randn(rows, rank).to(torch.bfloat16)
    weight = torch.randn(columns, rank).to(torch.bfloat16)
    for up, down in ((weight.t(), down), (weight.t().contiguous(), down), (weight.t(), down.t().contiguous().t())):
        exact = out.double() + down.double() @ up.double()
        truncated = (exact.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
        got = out.clone()
        assert lora_kernels.add_low_rank_(got, down, up) is got
        assert ((got.double() - exact).abs() <= exact.abs() * 2**-7).all()
        assert (got.float() == truncated).float().mean() > 0.99
print("low-rank add ok")
"""


def test_the_gpu_low_rank_add_is_addmm():
    assert on_triton_interpreter(_LOW_RANK_ADD_ON_THE_INTERPRETER).strip() == "low-rank add ok"
