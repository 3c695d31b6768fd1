"""The frozen base in FP8: refused where there are no FP8 tensor cores, arithmetic against bf16, LoRA still trains,
and the adapter it trains is an ordinary one."""

import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from conftest import ROOT, on_triton_interpreter, spy
from finetune import fp8, modeling


def _cpu_scaled_mm_works() -> bool:
    try:
        ones = torch.ones(16, 16).to(fp8.E4M3)
        torch._scaled_mm(ones, ones.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, NotImplementedError):
        return False


needs_scaled_mm = pytest.mark.skipif(not _cpu_scaled_mm_works(), reason="this torch has no FP8 matmul on the CPU")
# for a test whose model lives on the machine's device: a GPU with FP8 tensor cores, else the CPU
needs_fp8_on_device = pytest.mark.skipif(
    not (fp8.unsupported_reason() is None if torch.cuda.is_available() else _cpu_scaled_mm_works()),
    reason="no FP8 matmul on this machine's device")


@pytest.mark.skipif(fp8.unsupported_reason() is None, reason="this machine has FP8 tensor cores")
def test_fp8_is_refused_without_fp8_tensor_cores(tmp_path):
    done = subprocess.run([sys.executable, "base_example.py", "--model", "tiny-starcoder", "--dataset", "stdlib-code",
                           "--quantization", "fp8", "--output_dir", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: --quantization fp8 needs FP8 tensor cores: {fp8.unsupported_reason()}; leave out --quantization fp8"]
    assert not (tmp_path / "out").exists()


@needs_scaled_mm
def test_fp8_layer_matches_bf16_within_e4m3_rounding():
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 192, dtype=torch.bfloat16).requires_grad_(False)
    layer = fp8.Float8Linear(dense.weight, dense.bias)
    assert layer.weight.dtype == fp8.E4M3 and not layer.weight.requires_grad
    x = torch.randn(3, 40, 256, dtype=torch.bfloat16, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_()
    y, y_reference = layer(x), dense(x_reference)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_reference.backward(grad)
    # e4m3 keeps 3 mantissa bits: about 2^-4 relative error per element, averaged down in each dot product
    for ours, reference in ((y, y_reference), (x.grad, x_reference.grad)):
        error = (ours.float() - reference.float()).norm() / reference.float().norm()
        assert 0 < error < 0.06, error


@pytest.fixture(scope="module")
def fp8_adapter(tmp_path_factory):
    """The tiny StarCoder with LoRA, its base converted to FP8, after ten training steps; the adapter saved."""
    torch.manual_seed(0)
    model = modeling.add_lora(modeling.load_quantized("tiny-starcoder", "none"),
                              modeling.lora_config(r=4, alpha=8, dropout=0.0, targets="c_attn,c_proj"))
    replaced = fp8.convert(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 4000, (2, 32))
    for _ in range(10):
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
    directory = tmp_path_factory.mktemp("fp8-adapter")
    model.save_pretrained(directory)
    return model, directory, replaced, before, grads


@needs_scaled_mm
def test_lora_trains_over_an_fp8_base(fp8_adapter):
    model, _, replaced, before, grads = fp8_adapter
    assert replaced == 4 * 4 + 1  # four linears in each of 4 blocks, and the tied LM head
    assert grads and all("lora_A" in name or "lora_B" in name for name in grads)
    assert any("lora_B" in name for name in grads)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], weight) for name, weight in before.items()), "a base weight changed"


@needs_scaled_mm
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_an_adapter_trained_over_fp8_loads_into_a_16_bit_or_4_bit_base(fp8_adapter, quantization):
    model, directory, *_ = fp8_adapter
    loaded = PeftModel.from_pretrained(modeling.load_quantized("tiny-starcoder", quantization), directory)
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    reloaded = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[n].cpu(), reloaded[n].cpu().to(trained[n].dtype)) for n in trained)
    assert any(p.abs().sum() > 0 for n, p in reloaded.items() if "lora_B" in n)


def test_conversion_moves_each_layer_to_the_device_as_it_quantizes():
    """An FP8 base loads on the CPU and reaches the GPU a layer at a time (a 24 GB card cannot hold StarCoder-15B in
    bf16). The meta device stands in for the GPU: every converted layer lands there, the rest stays for model.to."""
    model = modeling.add_lora(modeling.load_model("tiny-starcoder", None, torch.bfloat16, on_cpu=True),
                              modeling.lora_config(r=4, alpha=8, dropout=0.0, targets="c_attn,c_proj"))
    replaced = fp8.convert(model, torch.device("meta"))
    converted = [m for m in model.modules() if isinstance(m, fp8.Float8Linear)]
    assert replaced == len(converted) == 4 * 4 + 1
    assert all(m.weight.is_meta and m.weight.dtype == fp8.E4M3 and m.weight_scale.is_meta for m in converted)
    assert all(m.bias is None or m.bias.is_meta for m in converted)
    assert not model.get_input_embeddings().weight.is_meta  # not a linear layer: moved with the rest
    assert all(not p.is_meta for n, p in model.named_parameters() if "lora_" in n)


# The GPU's Triton kernels (finetune/fp8_kernels.py), run here by Triton's interpreter on the CPU. Its cast to e4m3
# is not the GPU's: it rounds an exact tie away from zero, flushes subnormals (below 2^-6), and where rounding up
# reaches a power of two it gives half of it (127.9 becomes 64, not 128). So values are compared within one e4m3 step
# except where the reference is a power of two; on the GPU they are bit for bit fp8._quantize_rows's
# (bench/fp8_gemms.py checks that).
_KERNELS_ON_THE_INTERPRETER = """
import torch
from finetune import fp8, fp8_kernels

def check(values, scales, expected, expected_scales):
    assert values.dtype == fp8.E4M3 and values.shape == expected.shape and scales.shape == (expected.shape[0], 1)
    torch.testing.assert_close(scales, expected_scales, rtol=1e-6, atol=0)
    step = expected.float().abs() / 8 + 2 ** -6  # one e4m3 step at the value, or the subnormal range
    power_of_two = expected.float().abs().log2().frac() == 0
    assert ((values.float() - expected.float()).abs() <= step)[~power_of_two].all()
    assert (values.float() == expected.float()).float().mean() > 0.95
    assert values[0, 5] == 0 and (values[1] == 0).all() and scales[1].item() > 0

torch.manual_seed(0)
for rows, width in ((3, 700), (2, 1500), (2, 9000)):  # one chunk; two; three of the wide kind
    x = (torch.randn(rows, width) * 3).to(torch.bfloat16)
    x[0, 5] = 0  # an exact zero stays zero
    x[1] = 0  # a row of zeros: its scale is clamped, not a division by zero
    for column_scale in (None, torch.rand(width) + 0.5):
        check(*fp8_kernels.quantize_rows(x, column_scale),
              *fp8._quantize_rows(x, None if column_scale is None else column_scale.view(1, -1)))
    # the GELU in the same pass: its output within one bf16 step (truncated here) of the exact one, and the rows
    # quantized are that output as written
    activations = torch.full_like(x, float("nan"))
    values, scales = fp8_kernels.quantize_rows(x, gelu_out=activations)
    exact = torch.nn.functional.gelu(x.double(), approximate="tanh")
    assert ((activations.double() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-6).all()
    check(values, scales, *fp8._quantize_rows(activations))

weight = torch.randn(300, 130).to(fp8.E4M3)
assert torch.equal(fp8_kernels.transposed(weight).view(torch.uint8), weight.t().contiguous().view(torch.uint8))

# a 4-bit weight straight to e4m3 (--fp8_matmuls): bitsandbytes' NF4 with and without double quantization, in shapes
# that fill no tile, against unpacking it and dividing by the row scales. Rows are whole 64-value blocks, as in every
# StarCoder weight: bitsandbytes' CPU unpacking (0.50.2), the reference here, is off where a block spans two rows.
import bitsandbytes

for rows, columns, nested in ((100, 192, True), (72, 128, False), (130, 320, True)):
    dense = torch.randn(rows, columns).to(torch.bfloat16)
    packed, state = bitsandbytes.functional.quantize_4bit(dense, blocksize=64, compress_statistics=nested,
                                                          quant_type="nf4")
    weight = bitsandbytes.nn.Params4bit(packed, requires_grad=False, quant_state=state)
    row_scales = fp8.row_scales_of_4bit(weight)
    expected = fp8.from_4bit(weight, row_scales)
    values = fp8_kernels.from_nf4(packed, state, row_scales)
    # the same values, but where the interpreter's e4m3 cast is off at powers of two (which check() leaves out too),
    # and rarely a step off where the kernel's one division a block rounds otherwise than the reference's one a value
    assert values.dtype == fp8.E4M3 and values.shape == expected.shape
    power_of_two = expected.float().abs().log2().frac() == 0
    close = (values.float() - expected.float()).abs() <= expected.float().abs() / 8 + 2 ** -6
    assert close[~power_of_two].all() and (values.float() == expected.float())[~power_of_two].float().mean() > 0.99
    assert torch.equal(fp8_kernels.from_nf4(packed, state, row_scales, transpose=True).view(torch.uint8),
                       values.t().contiguous().view(torch.uint8))
# a row of a block and a half is refused, not unpacked wrong (fp8.from_4bit unpacks such a weight without the kernel)
packed, state = bitsandbytes.functional.quantize_4bit(torch.randn(8, 96).to(torch.bfloat16), blocksize=64,
                                                      quant_type="nf4")
try:
    fp8_kernels.from_nf4(packed, state, torch.ones(8))
    raise SystemExit("a row of 1.5 blocks was unpacked")
except ValueError as refused:
    assert "whole blocks" in str(refused)
print("kernels ok")
"""


def test_the_gpu_quantization_and_transpose_kernels_agree_with_the_reference():
    assert on_triton_interpreter(_KERNELS_ON_THE_INTERPRETER).strip() == "kernels ok"


@pytest.mark.parametrize("columns,blocksize,takes", [(128, 64, True), (6144, 64, True), (96, 64, False),
                                                     (512, 128, True), (1024, 512, False)])
def test_the_4_bit_kernel_is_used_only_where_its_tiles_hold_whole_blocks(columns, blocksize, takes):
    """fp8.from_4bit's choice on a GPU: the kernel where each row is whole blocks of at most 256 values, else the
    plain unpacking (a pre-quantized checkpoint may bring other block sizes; a small model, other widths)."""
    import bitsandbytes

    _, state = bitsandbytes.functional.quantize_4bit(torch.randn(4, columns).to(torch.bfloat16), blocksize=blocksize,
                                                     quant_type="nf4")
    assert fp8.kernel_unpacks(state) is takes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' GPU packing, which the kernel reads")
def test_the_4_bit_to_e4m3_kernel_gives_bitsandbytes_unpacking_quantized_on_a_gpu():
    """On a GPU, --fp8_matmuls' kernel against bitsandbytes' own unpacking in fp32 quantized by our row kernel, both
    layouts, a weight of StarCoder-15B's MLP shape: the kernel divides each block's absmax by the row's scale once,
    where the reference divides each value, so a value may round to the neighbouring e4m3 step, and rarely does."""
    import bitsandbytes

    torch.manual_seed(0)
    dense = torch.randn(24576, 6144, dtype=torch.bfloat16, device="cuda")
    packed, state = bitsandbytes.functional.quantize_4bit(dense, blocksize=64, compress_statistics=True,
                                                          quant_type="nf4")
    weight = bitsandbytes.nn.Params4bit(packed, requires_grad=False, quant_state=state)
    row_scales = fp8.row_scales_of_4bit(weight)
    expected, expected_scales = fp8.quantize_rows(fp8.unpacked_fp32(weight))
    assert torch.equal(row_scales, expected_scales.view(-1))
    for transpose in (False, True):
        values = fp8.from_4bit(weight, row_scales, transpose).float()
        reference = (expected.t().contiguous() if transpose else expected).float()
        assert ((values - reference).abs() <= reference.abs() / 8).all()
        assert (values == reference).float().mean() > 0.999


@needs_scaled_mm
def test_the_lean_fp8_recipe_trains_its_4_bit_base_in_fp8(tmp_path, monkeypatch):
    """--recipe lean_fp8 through the real pipeline and Trainer: the NF4 base stays stored in 4 bits (no FP8 layer
    replaces it), every 4-bit layer multiplies in FP8, adapted or not, and the run learns. The GPU's FP8 tensor cores
    are what the CPU lacks: its FP8 matmul stands in."""
    from conftest import tiny_args
    from finetune import cli, pipeline, training

    monkeypatch.setattr(fp8, "unsupported_reason", lambda: None)
    made = spy(monkeypatch, fp8, "from_4bit")
    args = tiny_args(tmp_path, **{**cli.RECIPES["lean_fp8"], "seq_length": 64, "batch_size": 2}, dtype="bfloat16",
                     max_train_steps=4, learning_rate=1e-3)
    run = pipeline.prepare(args)
    import bitsandbytes

    layers = [m for m in run.model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert len(layers) == 4 * 4 and all(hasattr(m, "fp8_row_scales") for m in layers)
    assert not any(isinstance(m, fp8.Float8Linear) for m in run.model.modules())
    trainer = training.build_trainer(args, run)
    training.train(trainer, args, run)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    # each step: every layer's forward, its recompute (all checkpointed on the CPU) and backward, but the first
    # c_attn's backward (the embeddings' gradient is not needed); evaluation adds forwards
    assert len(made) >= 4 * (3 * len(layers) - 1) and len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.skipif(fp8.unsupported_reason() is None, reason="this machine has FP8 tensor cores")
@pytest.mark.parametrize("flags,message", [
    (["--recipe", "lean_fp8"], f"--fp8_matmuls (--recipe lean_fp8 sets it) needs FP8 tensor cores: "
                               f"{fp8.unsupported_reason()}; set --fp8_matmuls false"),
    (["--fp8_matmuls", "--quantization", "none"], "--fp8_matmuls multiplies a 4-bit base in FP8, and --quantization "
                                                  "none is not 4-bit: leave out --quantization none, or leave out "
                                                  "--fp8_matmuls (--quantization fp8 multiplies in FP8 without it)"),
    (["--recipe", "lean_fp8", "--lora_dropout", "0.05"], "--fp8_matmuls (--recipe lean_fp8 sets it) runs on the fused "
                                                         "LoRA path, and --lora_dropout 0.05 takes the layers off it: "
                                                         "leave out --lora_dropout 0.05, or set --fp8_matmuls false"),
    (["--fp8_matmuls", "--dtype", "float16"], "--fp8_matmuls computes in bf16 (FP8 matmuls write bf16), not --dtype "
                                              "float16: leave out --dtype float16"),
])
def test_fp8_matmuls_are_refused_where_they_cannot_run(tmp_path, flags, message):
    done = subprocess.run([sys.executable, "base_example.py", "--model", "tiny-starcoder", "--dataset", "stdlib-code",
                           "--output_dir", str(tmp_path / "out"), *flags], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [f"error: {message}"], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
