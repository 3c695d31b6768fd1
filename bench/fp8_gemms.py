"""The frozen base's GEMMs of one StarCoder training step, one layer kind at a time: bf16, NF4 and FP8.

    python bench/fp8_gemms.py --size 15b --tokens 8192 --json fp8_gemms.json     # a GPU with FP8 (>= 8.9)

For each linear layer of a block (and the LM head), forward y = x W^T plus the input gradient dy W at `--tokens`
tokens, timed with CUDA events on random data, in four forms of the frozen weight:
- `bf16`: a plain frozen nn.Linear (the ceiling of a bf16 base);
- `nf4`: bitsandbytes' Linear4bit with NF4 and double quantization, as `--quantization 4bit` trains;
- `fp8`: finetune.fp8.Float8Linear, as `--quantization fp8` trains: weights stored in e4m3 once, activations and
  output gradients quantized each step (included in the time), the weight transposed for the backward each step;
- `nf4_to_fp8`: NF4 kept and multiplied in FP8, as `--fp8_matmuls` trains: each weight unpacked straight to e4m3 in
  every forward and backward (fp8.from_4bit, included in the time).
For each NF4 weight it also times its unpacking: bitsandbytes' to bf16 against our kernel's to e4m3, in both layouts
and at each tile size of a sweep (finetune/fp8_kernels.py, `from_nf4`).
For the FP8 form it also times the backward's weight transpose (PyTorch's copy, a compiled one, and the Triton kernel
finetune/fp8_kernels.py gives it); the quantization of an output gradient by rows at each width (a compiled one, the
Triton kernel, and the kernel at each chunk size of a sweep, checked bit for bit against the plain code); and the FP8
GEMMs alone (forward and input gradient, quantization excluded) in four forms: a scale per row or one per
tensor, with exact or Hopper's fast accumulation (finetune/fp8.py uses scales per row, fast accumulation). And
LoRA's rank-16 add into the layer's output and into its input gradient: addmm_ against our Triton kernel
(finetune/lora_kernels.py) and a sweep of its tile sizes. For the MLP's down projection, its GELU and the
quantization of its output, apart and in one pass (finetune/fp8_kernels.py).
Per step = 40 (or the size's layer count) x the four block GEMMs + the LM head.
"""

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from finetune import fp8, fp8_kernels, lora_kernels, manifest  # noqa: E402
from bench import arguments  # noqa: E402
from bench.recipes import write_json  # noqa: E402
from bench.timing import milliseconds  # noqa: E402
from finetune.architecture import config as architecture_config  # noqa: E402


def layer_shapes(size: str) -> dict[str, tuple[int, int, int]]:
    """(in, out, count per step) of each frozen linear of a StarCoder model."""
    config = architecture_config("gpt_bigcode", size)
    width, inner, kv = config.n_embd, config.n_inner, 2 * (config.n_embd // config.n_head)
    layers = config.n_layer
    return {"c_attn": (width, width + kv, layers), "attn.c_proj": (width, width, layers),
            "c_fc": (width, inner, layers), "mlp.c_proj": (inner, width, layers),
            "lm_head": (width, config.vocab_size, 1)}


def forms(in_features: int, out_features: int) -> dict:
    import bitsandbytes

    dense = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
    dense.requires_grad_(False)
    nf4 = bitsandbytes.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.bfloat16,
                                     quant_type="nf4", compress_statistics=True)
    nf4.weight = bitsandbytes.nn.Params4bit(dense.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                            compress_statistics=True)
    nf4 = nf4.cuda()
    nf4_to_fp8 = copy.copy(nf4)  # the same weight; its forward, not nf4's, becomes FP8's
    fp8.multiply_4bit_in_fp8(nf4_to_fp8)
    return {"bf16": dense, "nf4": nf4, "fp8": fp8.Float8Linear(dense.weight, None), "nf4_to_fp8": nf4_to_fp8}


UNPACK_TILES = ((32, 256, 4), (64, 256, 8), (128, 128, 8), (64, 512, 8))  # (rows, columns, warps) of the sweep


def unpack_forms(layer) -> dict[str, float]:
    """ms to unpack one NF4 weight: bitsandbytes' to bf16, our kernel's to e4m3 (out, in) and transposed (in, out),
    then each layout at each tile size of the sweep."""
    import bitsandbytes

    weight, scales = layer.weight, layer.fp8_row_scales
    times = {"bitsandbytes_bf16": milliseconds(lambda: bitsandbytes.functional.dequantize_4bit(weight.data,
                                                                                               weight.quant_state)),
             "e4m3": milliseconds(lambda: fp8.from_4bit(weight, scales)),
             "e4m3_transposed": milliseconds(lambda: fp8.from_4bit(weight, scales, transpose=True))}
    for rows, columns, warps in UNPACK_TILES:
        for transpose in (False, True):
            times[f"{rows}x{columns}x{warps}{'_transposed' if transpose else ''}"] = milliseconds(
                lambda: fp8_kernels.from_nf4(weight.data, weight.quant_state, scales, transpose, rows, columns, warps))
    return times


def scaled_mm_forms(tokens: int, in_features: int, out_features: int) -> dict[str, float]:
    """ms of the forward and the input-gradient FP8 GEMM together, per form of scaling and accumulation."""
    x, grad = (torch.randn(tokens, n, device="cuda").to(fp8.E4M3) for n in (in_features, out_features))
    weight = torch.randn(out_features, in_features, device="cuda").to(fp8.E4M3)
    weight_t = weight.t().contiguous()
    rows = {"x": torch.rand(tokens, 1, device="cuda"), "w": torch.rand(1, out_features, device="cuda"),
            "wt": torch.rand(1, in_features, device="cuda")}
    one = torch.tensor(1.0, device="cuda")
    times = {}
    for scaling in ("row", "tensor"):
        a, b, bt = (rows["x"], rows["w"], rows["wt"]) if scaling == "row" else (one, one, one)
        for accumulation, fast in (("exact", False), ("fast", True)):
            def both():
                torch._scaled_mm(x, weight.t(), scale_a=a, scale_b=b, out_dtype=torch.bfloat16, use_fast_accum=fast)
                torch._scaled_mm(grad, weight_t.t(), scale_a=a, scale_b=bt, out_dtype=torch.bfloat16,
                                 use_fast_accum=fast)
            times[f"{scaling}_{accumulation}"] = milliseconds(both)
    return times


CHUNKS = ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16))  # (values a chunk, warps) of the sweep


def quantize_forms(tokens: int, width: int) -> dict:
    """ms to quantize an output gradient (tokens, width) with its column factors, as input_grad_rows does: compiled
    (width static, tokens dynamic), the Triton kernel as it chooses, and at each chunk size; and whether the kernel's
    result is the plain code's bit for bit."""
    grad = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    column_scale = torch.rand(1, width, device="cuda") + 0.5
    compiled = torch.compile(fp8._quantize_rows, dynamic=False)
    values, scales = fp8_kernels.quantize_rows(grad, column_scale)
    expected, expected_scales = fp8._quantize_rows(grad, column_scale)
    times = {"identical": torch.equal(values.view(torch.uint8), expected.view(torch.uint8))
             and torch.equal(scales, expected_scales),
             "compiled": milliseconds(lambda: compiled(grad, column_scale)),
             "triton": milliseconds(lambda: fp8_kernels.quantize_rows(grad, column_scale))}
    for chunk in CHUNKS:
        times[f"triton_{chunk[0]}x{chunk[1]}"] = milliseconds(lambda: fp8_kernels.quantize_rows(grad, column_scale,
                                                                                                 chunk))
    return times


BLOCKS = ((64, 128), (64, 256), (128, 128), (128, 256), (32, 512))  # (rows, columns) of the sweep


def low_rank_add_forms(tokens: int, width: int, up_transposed: bool, rank: int = 16) -> dict:
    """ms of LoRA's rank-16 add into a (tokens, width) tensor in place, as the forward adds B's term (`up_transposed`:
    B^T, a transposed view) or the backward A's (contiguous): addmm_, our kernel as it chooses and at each block of a
    sweep; and the share of sums equal to addmm_'s."""
    out = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(width, rank, device="cuda", dtype=torch.bfloat16).t()
    up = up if up_transposed else up.contiguous()
    equal = (lora_kernels.add_low_rank_(out.clone(), down, up) == out.clone().addmm_(down, up)).float().mean()
    times = {"equal_share": equal.item(), "addmm": milliseconds(lambda: out.addmm_(down, up)),
             "triton": milliseconds(lambda: lora_kernels.add_low_rank_(out, down, up))}
    for block in BLOCKS:
        times[f"triton_{block[0]}x{block[1]}"] = milliseconds(lambda: lora_kernels.add_low_rank_(out, down, up, block))
    return times


def gelu_forms(tokens: int, width: int) -> dict:
    """ms of an MLP down projection's GELU (input `width` wide) and its output's quantization, apart and in
    finetune/fp8_kernels.py's one pass, with the share of the fused pass's results equal to the separate ones'."""
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16) * 2
    activations = torch.empty_like(x)

    def forward_apart():
        separate = torch.nn.functional.gelu(x, approximate="tanh")
        return separate, fp8_kernels.quantize_rows(separate)

    separate, (values, _) = forward_apart()
    fused_values, _ = fp8_kernels.quantize_rows(x, gelu_out=activations)
    return {"gelu_equal_share": (activations == separate).float().mean().item(),
            "quantized_equal_share": (fused_values.float() == values.float()).float().mean().item(),
            "forward_apart": milliseconds(forward_apart),
            "forward_fused": milliseconds(lambda: fp8_kernels.quantize_rows(x, gelu_out=activations))}


def main(options) -> dict:
    results = {}
    for name, (in_features, out_features, count) in layer_shapes(options.size).items():
        x = torch.randn(options.tokens, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(options.tokens, out_features, device="cuda", dtype=torch.bfloat16)
        row = {"count": count}
        for form, layer in forms(in_features, out_features).items():
            row[form] = milliseconds(lambda: layer(x).backward(grad))
            if form == "nf4_to_fp8":
                row["unpack"] = unpack_forms(layer)
            if form == "fp8":  # the backward's weight transpose
                compiled = torch.compile(lambda weight: weight.t().contiguous())
                row["transpose_eager"] = milliseconds(lambda: layer.weight.t().contiguous())
                row["transpose_compiled"] = milliseconds(lambda: compiled(layer.weight))
                row["transpose_triton"] = milliseconds(lambda: fp8.transposed(layer.weight))
        row["quantize_output_gradient"] = quantize_forms(options.tokens, out_features)
        row["scaled_mm"] = scaled_mm_forms(options.tokens, in_features, out_features)
        row["low_rank_add"] = {"output": low_rank_add_forms(options.tokens, out_features, up_transposed=True),
                               "input_gradient": low_rank_add_forms(options.tokens, in_features, up_transposed=False)}
        if name == "mlp.c_proj":
            row["gelu"] = gelu_forms(options.tokens, in_features)
        results[name] = row
        print(json.dumps({name: row}), flush=True)
    totals = {form: sum(row[form] * row["count"] for row in results.values()) for form in ("bf16", "nf4", "fp8",
                                                                                             "nf4_to_fp8")}
    gemm_forms = {form: sum(row["scaled_mm"][form] * row["count"] for row in results.values())
                  for form in next(iter(results.values()))["scaled_mm"]}
    header = manifest.provenance()
    print(f"\n{header['device']}, StarCoder-{options.size}, {options.tokens} tokens, forward + input gradient, ms")
    print(f"{'layer':12s} {'count':>5s} {'bf16':>8s} {'nf4':>8s} {'fp8':>8s} {'nf4->fp8':>9s}   fp8 weight "
          f"transpose: eager, compiled, Triton   output gradient quantized: compiled, Triton")
    for name, row in results.items():
        quantize = row["quantize_output_gradient"]
        print(f"{name:12s} {row['count']:5d} {row['bf16']:8.2f} {row['nf4']:8.2f} {row['fp8']:8.2f} "
              f"{row['nf4_to_fp8']:9.2f}   {row['transpose_eager']:.3f}, {row['transpose_compiled']:.3f}, "
              f"{row['transpose_triton']:.3f}   {quantize['compiled']:.3f}, {quantize['triton']:.3f}"
              f"{'' if quantize['identical'] else ' (NOT identical to the plain code)'}")
    print(f"{'per step':12s} {'':5s} {totals['bf16']:8.1f} {totals['nf4']:8.1f} {totals['fp8']:8.1f} "
          f"{totals['nf4_to_fp8']:9.1f}")
    print("FP8 GEMMs alone per step, ms: " + ", ".join(f"{form} {ms:.1f}" for form, ms in gemm_forms.items()))
    print("LoRA's rank-16 add, ms, addmm_ -> Triton: " + ", ".join(
        f"{name} {row['low_rank_add']['output']['addmm']:.3f} -> {row['low_rank_add']['output']['triton']:.3f} and "
        f"{row['low_rank_add']['input_gradient']['addmm']:.3f} -> {row['low_rank_add']['input_gradient']['triton']:.3f}"
        for name, row in results.items()))
    print("An NF4 weight unpacked, ms, bitsandbytes to bf16 -> ours to e4m3, transposed: " + ", ".join(
        f"{name} {row['unpack']['bitsandbytes_bf16']:.3f} -> {row['unpack']['e4m3']:.3f}, "
        f"{row['unpack']['e4m3_transposed']:.3f}" for name, row in results.items()))
    gelu = results["mlp.c_proj"]["gelu"]
    print(f"The MLP's GELU and its output's quantization, ms a layer, apart -> one pass: {gelu['forward_apart']:.3f} "
          f"-> {gelu['forward_fused']:.3f}")
    write_json(options.json, {**header, "size": options.size, "tokens": options.tokens, "per_step_ms": totals,
                              "scaled_mm_per_step_ms": gemm_forms}, results)
    return results


if __name__ == "__main__":
    parser = arguments.parser(__doc__)
    parser.add_argument("--size", default="15b")
    parser.add_argument("--tokens", type=arguments.at_least(1), default=8192,
                        help="tokens per step (batch x sequence length)")
    parser.add_argument("--json", type=arguments.output_file, default="")
    options = parser.parse_args()
    arguments.check_size(parser, "gpt_bigcode", options.size)
    if fp8.unsupported_reason():
        parser.error(fp8.unsupported_reason())
    main(options)
