"""Named fine-tuning recipes side by side on StarCoder's architecture with random weights: tokens/s, MFU, memory.

    python bench/recipes.py --size 15b --recipes tutorial,qlora,bf16_lora,fast,lean --json results.json  # one GPU
    python bench/recipes.py --size tiny --recipes tutorial,fast --steps 2                              # CPU check

The model is built through the scripts' own path (finetune.pipeline.model_for_training: `from_pretrained(None,
config=..., state_dict=..., quantization_config=...)`, per-example attention, LoRA, FP8 base layers, the chunked
loss), with random weights: no download, the same quantized layers as a real checkpoint. Packed recipes train on
blocks packed by the real packing code from random examples of 80-600 tokens (CodeAlpaca-like lengths); the others
on examples of seq_length/8 to seq_length tokens, padded per batch. Each recipe trains in its own subprocess with
the real Trainer and TFLOPSCallback; the first `--warmup` steps are excluded. Throughput counts non-padding tokens;
MFU is against the dense bf16 peak whatever the matmuls ran in, and the table adds the FP8 peak. The same run
measures the bf16 matmul ceiling. With `--verify_flops`, the first recipe also counts one step's FLOPs with torch's
FlopCounterMode and times the steps with CUDA events: an independent check of the callback's model TFLOP/s.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from finetune import cli, manifest  # noqa: E402
from finetune.errors import child_failure  # noqa: E402
from flops_counter import peak_tflops  # noqa: E402

# Each recipe: TrainArguments values, as the scripts' --recipe presets (finetune/cli.py) plus variants. "tutorial" is
# the tutorial's; "qlora" the common QLoRA recipe (TRL's and the personal-copilot examples: NF4, bf16 autocast,
# fp32 upcasts, gradient checkpointing); "bf16_lora" LoRA on an unquantized bf16 base with peft's defaults; "fast",
# "fp8" and "lean" are ours (docs/PERFORMANCE.md); "fast_joined" is "fast" with examples joined in their block
# (attention across them, StarCoder's attention dropout on), as packing worked before per-example attention.
RECIPES = {
    "tutorial": cli.RECIPES["tutorial"],
    "qlora": cli.RECIPES["qlora"],
    "qlora_no_ckpt": dict(cli.RECIPES["qlora"], batch_size=2, gradient_checkpointing=False),
    "bf16_lora": dict(cli.RECIPES["qlora"], quantization="none", batch_size=2, gradient_checkpointing=False),
    "fast": cli.RECIPES["fast"],
    "fast_joined": dict(cli.RECIPES["fast"], packed_attention="joined"),
    "fast_b8": dict(cli.RECIPES["fast"], batch_size=8),
    "fast_bf16_base": dict(cli.RECIPES["fast"], quantization="none"),
    "fast_bf16_base_b3": dict(cli.RECIPES["fast"], quantization="none", batch_size=3),
    "fast_fp32_adapter": dict(cli.RECIPES["fast"], fp32_adapter=True),
    "fast_autocast": dict(cli.RECIPES["fast"], mixed_precision=True),
    "fp8": cli.RECIPES["fp8"],
    "fp8_b8": dict(cli.RECIPES["fp8"], batch_size=8),
    "lean": cli.RECIPES["lean"],
}


def matmul_ceiling() -> float | None:
    """bf16 TFLOP/s of a large matrix product on random data: the practical ceiling on this GPU."""
    if not torch.cuda.is_available():
        return None
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def random_state_dict(config, dtype) -> dict:
    """StarCoder-shaped random weights (GPT-2-style N(0, 0.02) init) on the GPU, for the loading path to quantize."""
    from finetune import modeling
    from transformers import GPTBigCodeForCausalLM

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in GPTBigCodeForCausalLM(config).state_dict().items()}
    device = modeling.device()  # this rank's GPU under torchrun (bench/ddp_scaling.py)
    generator = torch.Generator(device=device).manual_seed(0)
    return {name: (torch.randn(shape, generator=generator, device=device, dtype=dtype) * 0.02)
            for name, shape in shapes.items()}


def synthetic_examples(args, count: int, vocab: int):
    """Random token ids: `count` blocks packed by finetune.data.pack from examples of 80-600 tokens, or `count`
    examples of seq_length/8..seq_length tokens."""
    from datasets import Dataset

    from finetune import data

    generator = torch.Generator().manual_seed(0)
    lengths = []
    while args.packing and sum(lengths) < (count + 1) * args.seq_length:
        lengths.append(int(torch.randint(80, 601, (1,), generator=generator)))
    if not args.packing:
        lengths = torch.randint(args.seq_length // 8, args.seq_length + 1, (count,), generator=generator).tolist()
    ids = [torch.randint(1, vocab, (n,), generator=generator).tolist() for n in lengths]
    examples = Dataset.from_dict({"input_ids": ids, "labels": ids})
    if not args.packing:
        return examples
    return data.pack(examples, args.seq_length, args.packed_attention == "per_example").select(range(count))


class CudaEventTimer:
    """Independent step timing for --verify_flops: CUDA events at step boundaries, read after training."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.events.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
                timer.events[-1][0].record()

            def on_step_end(self, args, state, control, **kwargs):
                timer.events[-1][1].record()

        self.events, self.callback = [], Callback()

    def seconds(self, skip: int) -> float:
        torch.cuda.synchronize()
        return sum(begin.elapsed_time(end) for begin, end in self.events[skip:]) / 1e3


def run_one(name: str, size: str, steps: int, warmup: int, verify_flops: bool, seq_length: int = 0,
            profile_dir: str = "") -> dict:
    from finetune import modeling, pipeline, training
    from finetune.architecture import starcoder_config
    from flops_counter import TFLOPSCallback, flops_per_token
    from transformers import GPTBigCodeForCausalLM

    total_steps = warmup + steps
    with tempfile.TemporaryDirectory() as output_dir:
        args = cli.TrainArguments(**{**RECIPES[name], "seq_length": seq_length or RECIPES[name]["seq_length"]},
                                  model="random", max_train_steps=total_steps, logging_steps=total_steps,
                                  report_to="none", output_dir=output_dir)
        dtype = modeling.compute_dtype(args.dtype) if torch.cuda.is_available() else torch.float32
        config = starcoder_config(size)
        config._attn_implementation = "sdpa"
        state_dict = random_state_dict(config, dtype)
        lora = modeling.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout,
                                    ",".join(modeling.lora_targets(config, None)))
        started = time.perf_counter()
        model = pipeline.model_for_training(args, modeling.quantization_config(args.quantization, dtype), lora,
                                            None, args.packing and args.packed_attention == "per_example",
                                            model_class=GPTBigCodeForCausalLM, config=config, state_dict=state_dict)
        del state_dict
        load_seconds = time.perf_counter() - started
        tokenizer = modeling.load_tokenizer("tiny-starcoder")  # only its pad id is used, by the collator
        world = int(os.environ.get("WORLD_SIZE", "1"))  # each rank trains on its own 1/world of the examples
        train_set = synthetic_examples(args, total_steps * args.batch_size * world, config.vocab_size)
        tflops = TFLOPSCallback(warmup_steps=warmup)
        timer = CudaEventTimer() if verify_flops and torch.cuda.is_available() else None
        run = pipeline.Prepared(tokenizer, model, train_set, None, None, {})
        trainer = training.build_trainer(
            args, run, callbacks=[tflops] + ([timer.callback] if timer else []),
            eval_strategy="no", eval_on_start=False, save_strategy="no", load_best_model_at_end=False, warmup_steps=0,
            dataloader_num_workers=2, dataloader_pin_memory=torch.cuda.is_available(),
            **training.length_grouped(False))
        trainer.train()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"recipe": name, **RECIPES[name], "seq_length": args.seq_length, "size": size,
              "load_seconds": load_seconds, **tflops.summary, "fp8_peak_tflops": peak_tflops(gpu, fp8=True),
              "flops_per_token": flops_per_token(model, args.seq_length).model}
    autocast = dict(device_type="cuda", dtype=dtype, enabled=trainer.args.bf16 or trainer.args.fp16)
    if timer:
        from torch.utils.flop_counter import FlopCounterMode

        # One sequence: eager attention keeps every score matrix, which at full batch does not fit. Joined examples
        # only: FlopCounterMode has no formula for the variable-length attention kernel.
        if "position_ids" in train_set.column_names:
            raise SystemExit(f"--verify_flops needs a recipe without per-example attention (fast_joined), not {name}")
        batch = first_batch(train_set, 1, tokenizer)
        # bitsandbytes' 4-bit matmul is a custom op that FlopCounterMode has no formula for: 2 x tokens x in x out.
        gemm_4bit = {torch.ops.bitsandbytes.gemm_4bit: lambda a, *_, out_shape=None, **__: 2 * math.prod(a) *
                     out_shape[-1]} if args.quantization == "4bit" else {}
        counter = FlopCounterMode(display=False, custom_mapping=gemm_4bit)
        # Eager attention for the count: FlopCounterMode's SDPA rule rejects multi-query shapes (torch 2.11). The
        # backward runs on this thread, not the autograd engine's device thread, so the counter sees it too.
        inner = model.get_base_model()
        attention = inner.config._attn_implementation
        inner.set_attn_implementation("eager")
        # The model's own forward (not the chunked loss, whose autograd.grad inside the forward FlopCounterMode's
        # module hooks cannot follow): the same matmuls.
        with counter, torch.autocast(**autocast), torch.autograd.set_multithreading_enabled(False):
            type(inner).forward(inner, **batch).loss.backward()
        model.zero_grad(set_to_none=True)
        inner.set_attn_implementation(attention)
        ours = flops_per_token(model, args.seq_length)
        # FlopCounterMode charges full attention; the model count charges causal attention as half of it.
        attention_half = ours.breakdown["attention_forward"] + ours.breakdown["attention_backward"]
        counted = counter.get_total_flops() - attention_half * args.seq_length
        result["verify"] = {"flop_counter_per_token": counted / args.seq_length,
                            "event_model_tflops": counted * args.batch_size * steps / timer.seconds(warmup) / 1e12,
                            "callback_model_tflops": tflops.summary["model_tflops"]}
    if profile_dir and torch.cuda.is_available():
        result["profile"] = profile_step(model, first_batch(train_set, args.batch_size, tokenizer), autocast,
                                         profile_dir, name)
    return result


def first_batch(train_set, size: int, tokenizer) -> dict:
    """The first `size` examples as the training collator makes them, on the GPU."""
    from finetune.data import Collator

    batch = Collator(tokenizer)([train_set[i] for i in range(size)])
    return {key: value.cuda() if torch.is_tensor(value) else value
            for key, value in batch.items()}


def profile_step(model, batch: dict, autocast: dict, out_dir: str, name: str) -> str:
    """One training step under torch.profiler: the top CUDA kernels by time, written as a table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        with torch.autocast(**autocast):
            model(**batch).loss.backward()
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    table = profiler.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    path = os.path.join(out_dir, f"profile-{name}.txt")
    with open(path, "w") as f:
        f.write(table)
    return path


def run_recipe(name: str, options, launcher: tuple = (), extra: tuple = ()) -> dict:
    """Train one recipe in a child process, `python [launcher] recipes.py --one NAME` (the launcher: e.g. torchrun
    for bench/ddp_scaling.py): its result line, or its failure (oom or error, with the child's exception line)."""
    command = [sys.executable, *launcher, os.path.abspath(__file__), "--one", name, "--size", options.size,
               "--steps", str(options.steps), "--warmup", str(options.warmup), "--seq_length", str(options.seq_length),
               *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    status, error = child_failure(done.stderr)
    return {"recipe": name, **RECIPES.get(name, {}), "status": status, "error": error}


def write_json(path: str, header: dict, results: list[dict]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({**header, "results": results}, f, indent=1)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every recipe run takes, here and in bench/ddp_scaling.py."""
    parser.add_argument("--size", default="15b", choices=["15b", "7b", "3b", "1b", "tiny"])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the rates")
    parser.add_argument("--seq_length", type=int, default=0, help="override every recipe's sequence length")
    parser.add_argument("--json", default="", help="write the header and results here")


def main(options) -> list[dict]:
    ceiling = matmul_ceiling()
    header = {**manifest.provenance(), "bf16_matmul_tflops": ceiling}
    print(json.dumps(header))
    results = []
    for index, name in enumerate(options.recipes.split(",")):
        extra = ["--verify_flops"] if options.verify_flops and not index else []
        extra += ["--profile", options.profile, "--profile_dir", os.path.abspath(options.profile_dir)]
        results.append(run_recipe(name, options, extra=tuple(extra)))
        print(json.dumps(results[-1]), flush=True)
        write_json(options.json, header, results)  # after each recipe: a run cut short keeps what it measured
    print(f"\n{header['device']}, StarCoder-{options.size} random weights, {header['date']}, torch "
          f"{header['versions']['torch']}, bf16 matmul ceiling {ceiling or 0:.0f} TFLOP/s; MFU against the dense "
          f"bf16 peak, MFU8 against the dense FP8 peak")
    print(f"{'recipe':18s} {'quant':5s} {'batch x seq':>11s} {'ckpt':>4s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} "
          f"{'MFU8':>6s} {'peak GiB':>8s}")
    for row in results:
        if "tokens_per_second" not in row:
            print(f"{row['recipe']:18s} {row['status']}: {row['error']}")
            continue
        print(f"{row['recipe']:18s} {row.get('quantization', '4bit'):5s} {row['batch_size']:>4d} x "
              f"{row['seq_length']:<4d} {'yes' if row.get('gradient_checkpointing') else 'no':>4s} "
              f"{row['tokens_per_second']:9.0f} {row['model_tflops']:8.1f} {row.get('mfu', 0):6.1%} "
              f"{row['model_tflops'] / (row.get('fp8_peak_tflops') or math.inf):6.1%} "
              f"{row.get('peak_memory_gib', 0):8.1f}")
        if "verify" in row:
            v = row["verify"]
            print(f"  verify: callback {v['callback_model_tflops']:.1f} TFLOP/s vs FlopCounterMode over CUDA events "
                  f"{v['event_model_tflops']:.1f} ({v['callback_model_tflops'] / v['event_model_tflops'] - 1:+.2%})")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--recipes", default="tutorial,qlora,bf16_lora,fast,lean", help=f"from {', '.join(RECIPES)}")
    parser.add_argument("--verify_flops", action="store_true", help="check the first recipe's FLOPs count")
    parser.add_argument("--profile", default="", help="recipes to profile one step of (comma-separated)")
    parser.add_argument("--profile_dir", default=".", help="where the profile tables go")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one recipe in this process
    options = parser.parse_args()
    if options.one:
        result = run_one(options.one, options.size, options.steps, options.warmup, options.verify_flops,
                         options.seq_length, options.profile_dir if options.one in options.profile.split(",") else "")
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
    else:
        main(options)
