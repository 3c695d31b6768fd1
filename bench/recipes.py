"""Named fine-tuning recipes side by side on StarCoder's or StarCoder2's architecture with random weights: tokens/s,
MFU, memory.

    python bench/recipes.py --size 15b --recipes tutorial,qlora,bf16_lora,fast,lean --json results.json  # one GPU
    python bench/recipes.py --family starcoder2 --size 15b --recipes fast,fp8 --json sc2.json          # StarCoder2
    python bench/recipes.py --recipes fp8 --data files --seq_length 8192 --fim_rate 0.5                 # whole files
    python bench/recipes.py --size tiny --recipes tutorial,fast --steps 2                              # CPU check

The model is built through the scripts' own path (finetune.pipeline.model_for_training: `from_pretrained(None,
config=..., state_dict=..., quantization_config=...)`, per-example attention, LoRA, FP8 base layers, the chunked
loss), with random weights: no download, the same quantized layers as a real checkpoint. The shapes are
finetune/architecture.py's, from the published config.json files. Packed recipes train on blocks packed by the real
packing code from random examples of 80-600 tokens (CodeAlpaca-like lengths; `--data files`: 2,000-8,000, whole
source files), in FIM form by the real FIM code with `--fim_rate`; the others on examples of seq_length/8 to
seq_length tokens, padded per batch. Each recipe trains in its own subprocess with
the real Trainer and TFLOPSCallback; the first `--warmup` steps are excluded. Throughput counts non-padding tokens;
MFU is against the dense bf16 peak whatever the matmuls ran in, and the table adds the FP8 peak. The same run
measures the bf16 matmul ceiling, and each recipe's process the speed of a copy between pinned CPU memory and the GPU,
each way (`host_copy_gbps`), and in each step the training thread's CPU seconds and involuntary context switches
(`host_cpu_seconds`, `host_involuntary_switches`). With `--verify_flops`, every recipe's steps are also timed with
CUDA events (the callback's FLOPs over that independent clock), and a recipe with joined attention is also counted
by torch's FlopCounterMode: independent checks of the callback's model TFLOP/s.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import arguments  # noqa: E402
from bench.timing import milliseconds  # noqa: E402
from finetune import cli, manifest  # noqa: E402
from finetune.errors import child_failure  # noqa: E402
from finetune.files import write_atomically  # noqa: E402
from flops_counter import peak_tflops  # noqa: E402

# Each recipe: TrainArguments values, as the scripts' --recipe presets (finetune/cli.py) plus variants. "tutorial" is
# the tutorial's; "qlora" the common QLoRA recipe (TRL's and the personal-copilot examples: NF4, bf16 autocast,
# fp32 upcasts, gradient checkpointing); "bf16_lora" LoRA on an unquantized bf16 base with peft's defaults; "fast",
# "fp8" and "lean" are ours (docs/PERFORMANCE.md); "fast_joined" is "fast" with examples joined in their block
# (attention across them, StarCoder's attention dropout on), as packing worked before per-example attention; "_all"
# checkpoints every layer, where the recipe checkpoints only as many as the GPU's memory needs; "_b1" is a lean recipe
# as it was before its checkpointed layers' inputs went to CPU memory (1 x 2048, inputs on the GPU).
_LEAN_B1 = dict(cli.RECIPES["lean"], batch_size=1, offload_layer_inputs=False)
_LEAN_FP8_B1 = dict(cli.RECIPES["lean_fp8"], batch_size=1, offload_layer_inputs=False)
RECIPES = {
    "tutorial": cli.RECIPES["tutorial"],
    "qlora": cli.RECIPES["qlora"],
    "qlora_no_ckpt": dict(cli.RECIPES["qlora"], batch_size=2, gradient_checkpointing=False),
    "bf16_lora": dict(cli.RECIPES["qlora"], quantization="none", batch_size=2, gradient_checkpointing=False),
    "fast": cli.RECIPES["fast"],
    "fast_joined": dict(cli.RECIPES["fast"], packed_attention="joined"),
    "fast_b8": dict(cli.RECIPES["fast"], batch_size=8),
    "bf16": cli.RECIPES["bf16"],
    "fast_bf16_base_b3": dict(cli.RECIPES["fast"], quantization="none", batch_size=3),
    "fast_fp32_adapter": dict(cli.RECIPES["fast"], fp32_adapter=True),
    "fast_autocast": dict(cli.RECIPES["fast"], mixed_precision=True),
    "fp8": cli.RECIPES["fp8"],
    "fp8_joined": dict(cli.RECIPES["fp8"], packed_attention="joined"),
    "fp8_ckpt": dict(cli.RECIPES["fp8"], gradient_checkpointing=True),
    "fast_ckpt": dict(cli.RECIPES["fast"], gradient_checkpointing=True),
    "fp8_b8": dict(cli.RECIPES["fp8"], batch_size=8),
    "fp8_b6": dict(cli.RECIPES["fp8"], batch_size=6),
    "fp8_unfused": dict(cli.RECIPES["fp8"], fuse_lora=False),
    "fp8_compiled": dict(cli.RECIPES["fp8"], compile_layers=True),
    "fast_unfused": dict(cli.RECIPES["fast"], fuse_lora=False),
    "long": cli.RECIPES["long"],
    "long_fast": dict(cli.RECIPES["long"], quantization="4bit"),
    "fp8_lean": cli.RECIPES["fp8_lean"],
    "fp8_lean_b3": dict(cli.RECIPES["fp8_lean"], batch_size=3),
    "fp8_lean_all": dict(cli.RECIPES["fp8_lean"], checkpointed_layers="all"),
    "lean": cli.RECIPES["lean"],
    "lean_all": dict(cli.RECIPES["lean"], checkpointed_layers="all"),
    "lean_b1": _LEAN_B1,
    "lean_b1_all": dict(_LEAN_B1, checkpointed_layers="all"),
    "lean_b2": dict(_LEAN_B1, batch_size=2),
    "lean_b2_all": dict(_LEAN_B1, batch_size=2, checkpointed_layers="all"),
    # "_offN": N of the checkpointed layers offloaded to CPU memory instead of recomputed (finetune/offload.py)
    "lean_off20": dict(_LEAN_B1, checkpointed_layers="all", offloaded_layers=20),
    "lean_off40": dict(_LEAN_B1, checkpointed_layers="all", offloaded_layers=40),
    "lean_b2_off40": dict(_LEAN_B1, batch_size=2, checkpointed_layers="all", offloaded_layers=40),
    "lean_fp8": cli.RECIPES["lean_fp8"],
    "lean_fp8_all": dict(cli.RECIPES["lean_fp8"], checkpointed_layers="all"),
    "lean_fp8_b3_all": dict(cli.RECIPES["lean_fp8"], batch_size=3, checkpointed_layers="all"),
    "lean_fp8_b1": _LEAN_FP8_B1,
    "lean_fp8_b1_all": dict(_LEAN_FP8_B1, checkpointed_layers="all"),
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


def host_copy_gbps(megabytes: int = 256) -> dict | None:
    """GB/s of a copy between pinned CPU memory and the GPU, each way: the link the offloading recipes' copies share
    with the compute (lean_fp8's speed has varied between runs by up to 20% with steady steps, docs/PERFORMANCE.md)."""
    if not torch.cuda.is_available():
        return None
    host = torch.empty(megabytes << 20, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty_like(host, device="cuda")
    rate = lambda copy: host.numel() / milliseconds(copy) / 1e6  # noqa: E731
    rates = {"to_gpu": rate(lambda: gpu.copy_(host, non_blocking=True)),
             "to_host": rate(lambda: host.copy_(gpu, non_blocking=True))}
    del host, gpu
    torch.cuda.empty_cache()  # the recipe's memory starts as it would without this
    return rates


def causal_lm_class(config):
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def random_state_dict(config, dtype, on_cpu: bool = False) -> dict:
    """Random weights of the config's shape (GPT-2-style N(0, 0.02) init), drawn on the GPU, for the loading path
    to quantize; `on_cpu`: kept on the CPU, as an FP8 base loads (finetune/pipeline.py)."""
    from finetune import modeling

    with torch.device("meta"):
        shapes = {name: p.shape for name, p in causal_lm_class(config)(config).state_dict().items()}
    device = modeling.device()  # this rank's GPU under torchrun (bench/ddp_scaling.py)
    generator = torch.Generator(device=device).manual_seed(0)
    return {name: (torch.randn(shape, generator=generator, device=device, dtype=dtype) * 0.02).to(
        "cpu" if on_cpu else device) for name, shape in shapes.items()}


# Example lengths in tokens: CodeAlpaca-like prompt/completion pairs, or whole source files.
DATA = {"pairs": (80, 600), "files": (2000, 8000)}


def synthetic_examples(args, count: int, vocab: int, data_mode: str = "pairs", fim_options=None):
    """Random token ids: `count` blocks packed by finetune.data.pack (FIM form with `fim_options`) from examples of
    DATA[data_mode] tokens, or `count` examples of seq_length/8..seq_length tokens."""
    from datasets import Dataset

    from finetune import data

    generator = torch.Generator().manual_seed(0)
    low, high = DATA[data_mode]
    lengths = []
    while args.packing and sum(lengths) < (count + 1) * args.seq_length:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    if not args.packing:
        lengths = torch.randint(args.seq_length // 8, args.seq_length + 1, (count,), generator=generator).tolist()
    ids = [torch.randint(20, vocab, (n,), generator=generator).tolist() for n in lengths]  # no special tokens
    examples = Dataset.from_dict({"input_ids": ids, "labels": ids})
    if not args.packing:
        return examples
    return data.pack(examples, args.seq_length, args.packed_attention == "per_example", fim_options).select(
        range(count))


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


class HostTimer:
    """The training thread's own CPU seconds and involuntary context switches (Linux counts them per thread) in each
    step, from its start to the moment the host has issued the step's last work, before the step's closing wait for
    the GPU (it runs before TFLOPSCallback, which waits). `lean_fp8` gave 7,344 and 9,362 tokens/s in one run, with the
    same GPU kernel time and a GPU idle longer for its launches (docs/PERFORMANCE.md, 2026-12-08): these tell a host
    that took more CPU time for the same work (a slower core) from a thread that waited its turn (more switches)."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.started = timer.usage()

            def on_step_end(self, args, state, control, **kwargs):
                seconds, switches = timer.usage()
                timer.cpu_seconds.append(seconds - timer.started[0])
                timer.switches.append(None if switches is None else switches - timer.started[1])

        self.cpu_seconds, self.switches, self.callback = [], [], Callback()

    @staticmethod
    def usage() -> tuple[float, int | None]:
        switches = None
        if sys.platform == "linux":
            import resource

            switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
        return time.thread_time(), switches


def recipe_and_cap(entry: str, default_cap: float) -> tuple[str, float]:
    """`NAME` or `NAME@GIB` of --recipes: a recipe and the GPU memory it runs under (`fp8,lean@16`: one table with
    each recipe on its own card's memory); without `@`, --memory_cap_gib's. ValueError for anything else."""
    name, at, cap = entry.partition("@")
    if name not in RECIPES or at and not (cap.replace(".", "", 1).isdigit() and float(cap) > 0):
        raise ValueError(f"{entry!r} is not NAME or NAME@GIB (GIB above 0) with NAME from {', '.join(RECIPES)}")
    return name, float(cap) if at else default_cap


def run_one(entry: str, options) -> dict:
    from finetune import architecture, fim, fusion, memory, modeling, offload, pipeline, training
    from flops_counter import TFLOPSCallback, flops_per_token

    name, memory_cap_gib = recipe_and_cap(entry, options.memory_cap_gib)
    total_steps = options.warmup + options.steps
    copy_gbps = host_copy_gbps()  # in this recipe's own process, as its pinned buffers will be
    if memory_cap_gib and torch.cuda.is_available():  # a smaller card's memory, on this one
        gpu = modeling.device()
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, memory_cap_gib * memory.GIB / torch.cuda.get_device_properties(gpu).total_memory), gpu)
    with tempfile.TemporaryDirectory() as output_dir:
        recipe = {**RECIPES[name], "seq_length": options.seq_length or RECIPES[name]["seq_length"],
                  "batch_size": options.batch_size or RECIPES[name]["batch_size"]}
        args = cli.TrainArguments(**recipe, model="random", max_train_steps=total_steps, logging_steps=total_steps,
                                  report_to="none", output_dir=output_dir)
        if args.fp8_off:
            modeling.check_fp8(f"recipe {name}", "leave it out of --recipes")
        modeling.check_quantization(args.quantization)
        dtype = modeling.compute_dtype(args.dtype) if torch.cuda.is_available() else torch.float32
        config = architecture.config(options.family, options.size)
        config._attn_implementation = "sdpa"
        # on the CPU where the run would load from disk without a 16-bit copy on the GPU: FP8 always, and under a cap
        # bitsandbytes too (it quantizes each weight as it moves to the GPU)
        state_dict = random_state_dict(config, dtype,
                                       on_cpu=args.quantization == "fp8" or bool(memory_cap_gib))
        targets = modeling.lora_targets(config, None)
        lora = modeling.lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, ",".join(targets))
        started = time.perf_counter()
        model = pipeline.model_for_training(args, modeling.quantization_config(args.quantization, dtype), lora,
                                            None, args.packing and args.packed_attention == "per_example",
                                            model_class=causal_lm_class(config), config=config, state_dict=state_dict)
        del state_dict
        load_seconds = time.perf_counter() - started
        recompute_gelu = fusion.recomputes_gelu(model)
        layers = modeling.decoder_layers(model)
        offloaded = offload.offloaded(layers)
        checkpointed = sum(layer.gradient_checkpointing for layer in layers) + offloaded
        estimated = memory.estimate(memory.shape_of(config, args.lora_r, targets),
                                    **{**memory.settings(args, checkpointed, recompute_gelu),
                                       "offloaded_layers": offloaded})["total"]  # offloading: GPUs only
        tokenizer = modeling.load_tokenizer("tiny-starcoder")  # its pad id for the collator, its FIM token ids
        fim_options = fim.Fim(fim.tokens(tokenizer, "tiny-starcoder"), options.fim_rate, 0.5, False,
                              tokenizer.eos_token_id) if options.fim_rate else None
        world = int(os.environ.get("WORLD_SIZE", "1"))  # each rank trains on its own 1/world of the examples
        train_set = synthetic_examples(args, total_steps * args.batch_size * world, config.vocab_size, options.data,
                                       fim_options)
        tflops, host = TFLOPSCallback(warmup_steps=options.warmup), HostTimer()
        timer = CudaEventTimer() if options.verify_flops and torch.cuda.is_available() else None
        profiler = StepProfiler(options.warmup - 1, os.path.join(options.profile_dir, f"profile-{name}.txt")) if (
            options.profile_dir and torch.cuda.is_available()) else None
        run = pipeline.Prepared(tokenizer, model, train_set, None, None, {})
        trainer = training.build_trainer(
            args, run, callbacks=[host.callback, tflops] + [extra.callback for extra in (timer, profiler) if extra],
            eval_strategy="no", eval_on_start=False, save_strategy="no", load_best_model_at_end=False, warmup_steps=0,
            dataloader_num_workers=2, dataloader_pin_memory=torch.cuda.is_available(),
            **training.length_grouped(False))
        trainer.train()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"recipe": name, **recipe, "family": options.family, "size": options.size, "data": options.data,
              "fim_rate": options.fim_rate, "memory_cap_gib": memory_cap_gib, "load_seconds": load_seconds,
              "recompute_gelu": recompute_gelu, "checkpointed_layers": checkpointed, "offloaded_layers": offloaded,
              "offloaded_inputs": offload.offloaded(layers, inputs=True),
              "estimated_memory_gib": estimated, "host_copy_gbps": copy_gbps,
              **tflops.summary, "step_seconds": tflops.step_times, "host_cpu_seconds": host.cpu_seconds,
              "host_involuntary_switches": host.switches, "fp8_peak_tflops": peak_tflops(gpu, fp8=True),
              "flops_per_token": flops_per_token(model, args.seq_length).model}
    autocast = dict(device_type="cuda", dtype=dtype, enabled=trainer.args.bf16 or trainer.args.fp16)
    if timer:
        # The callback's FLOPs over CUDA-event time: an independent clock for its TFLOP/s.
        flops = tflops.summary["model_tflops"] * 1e12 * sum(tflops.step_times[options.warmup :])
        result["verify"] = {"callback_model_tflops": tflops.summary["model_tflops"],
                            "event_model_tflops": flops / timer.seconds(options.warmup) / 1e12}
        window = getattr(config, "sliding_window", None) or math.inf
        # FlopCounterMode has no rule for the varlen kernel, and eager attention ignores the window in its count
        if "position_ids" not in train_set.column_names and args.seq_length <= window:
            counted, ours = flop_counter_per_token(model, train_set, tokenizer, autocast)
            result["verify"].update(flop_counter_per_token=counted, ours_per_token=ours)
    if profiler:
        result["profile"] = profiler.summary
    return result


def bitsandbytes_flop_formulas() -> dict:
    """bitsandbytes' matmuls are custom ops that FlopCounterMode has no formula for: 2 x tokens x in x out. The 4-bit
    one; LLM.int8's forward, with outlier columns (threshold 6, the default) or without (its backward, the input
    gradient, is an ordinary matmul that FlopCounterMode counts)."""
    import bitsandbytes  # noqa: F401  (registers the ops)

    ops = torch.ops.bitsandbytes
    return {ops.gemm_4bit: lambda a, *_, out_shape=None, **__: 2 * math.prod(a) * out_shape[-1],
            ops.int8_mixed_scaled_mm: lambda a, ca, cb, *_, **__: 2 * math.prod(a) * cb[0],
            ops.int8_scaled_mm: lambda a, b, *_, **__: 2 * math.prod(a) * b[0]}


def flop_counter_per_token(model, train_set, tokenizer, autocast: dict) -> tuple[float, float]:
    """One sequence's model FLOPs per token by torch's FlopCounterMode, an independent count, and ours for a sequence
    of its length. Per token of the sequence that ran, not of seq_length: an unpacked example is shorter (on
    2026-12-06 dividing by seq_length put the tutorial recipe's count 234% off)."""
    from torch.utils.flop_counter import FlopCounterMode

    from flops_counter import flops_per_token

    # One sequence: eager attention keeps every score matrix, which at full batch does not fit.
    batch = first_batch(train_set, 1, tokenizer, model.device)
    tokens = batch["input_ids"].shape[1]  # padding included: the model computes over it
    counter = FlopCounterMode(display=False, custom_mapping=bitsandbytes_flop_formulas())
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
    # FlopCounterMode charges full attention; the model count charges causal attention as half of it. (Eager
    # attention computes every score inside a sliding window's mask too: the caller checks unwindowed lengths only.)
    ours = flops_per_token(model, tokens)
    return (counter.get_total_flops() / tokens - (ours.breakdown["attention_forward"]
                                                  + ours.breakdown["attention_backward"]), ours.model)


def first_batch(train_set, size: int, tokenizer, device) -> dict:
    """The first `size` examples as the training collator makes them, on `device`."""
    from finetune.data import Collator

    batch = Collator(tokenizer)([train_set[i] for i in range(size)])
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


class StepProfiler:
    """torch.profiler over one whole Trainer step (forward, backward, the optimizer), the last warm-up one so that the
    profiler's overhead stays out of the rates: a table of the top CUDA kernels, and the GPU's busy time beside the
    step's, so the step's idle share shows too; and the step's timeline beside the table (`.json.gz`, for Perfetto
    or chrome://tracing), where each idle gap shows which CPU work the GPU waited for."""

    def __init__(self, step: int, path: str):
        from transformers import TrainerCallback

        profiler = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == step:
                    from torch.profiler import ProfilerActivity, profile

                    torch.cuda.synchronize()
                    profiler.active = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    profiler.active.__enter__()
                    profiler.started = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if profiler.active is not None:
                    torch.cuda.synchronize()
                    profiler.finish(time.perf_counter() - profiler.started)

        self.path, self.active, self.summary, self.callback = path, None, {}, Callback()

    def finish(self, seconds: float) -> None:
        from torch.autograd import DeviceType

        self.active.__exit__(None, None, None)
        self.active.export_chrome_trace(os.path.splitext(self.path)[0] + ".json.gz")
        events = self.active.events()
        kernels = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type == DeviceType.CUDA]
        busy = sum(end - start for start, end, _ in kernels) / 1e3
        idle = idle_gaps(kernels, min(e.time_range.start for e in events), max(e.time_range.end for e in events))
        table = self.active.key_averages().table(sort_by="cuda_time_total", row_limit=50, max_name_column_width=70)
        waits = "\n".join(f"  {ms:8.2f} ms before {name}" for name, ms in idle["before"])
        with open(self.path, "w") as f:
            f.write(f"one Trainer step under the profiler: {seconds * 1e3:.1f} ms, GPU kernels {busy:.1f} ms\n"
                    f"GPU idle {idle['total_ms']:.1f} ms: {idle['edges_ms']:.1f} before its first kernel and after its "
                    f"last, {idle['total_ms'] - idle['edges_ms']:.1f} between kernels, most of it before:\n{waits}\n"
                    f"{table}")
        self.summary = {"path": self.path, "profiled_step_ms": seconds * 1e3, "kernel_ms": busy, "idle": idle}
        self.active = None


def idle_gaps(kernels: list[tuple[float, float, str]], start: float, end: float, top: int = 12) -> dict:
    """Where the GPU idled between `start` and `end` (µs), from its kernels' (start, end, name) on any stream: the
    total, the part before the first kernel and after the last (the step's edges), and each gap between kernels
    charged to the kernel that ran next (what the GPU waited to be given), the `top` largest sums."""
    total = edges = 0.0
    before: dict[str, float] = {}
    last_end = None
    for kernel_start, kernel_end, name in sorted(kernels):
        gap = kernel_start - (start if last_end is None else last_end)
        if gap > 0:
            total += gap
            if last_end is None:
                edges += gap
            else:
                before[name] = before.get(name, 0.0) + gap
        last_end = kernel_end if last_end is None else max(last_end, kernel_end)
    tail = max(end - (start if last_end is None else last_end), 0.0)
    ranked = sorted(before.items(), key=lambda item: -item[1])[:top]
    return {"total_ms": (total + tail) / 1e3, "edges_ms": (edges + tail) / 1e3,
            "before": [(name, us / 1e3) for name, us in ranked]}


def run_recipe(name: str, options, launcher: tuple = (), extra: tuple = ()) -> dict:
    """Train one recipe in a child process, `python [launcher] recipes.py --one NAME` (the launcher: e.g. torchrun
    for bench/ddp_scaling.py): its result line, or its failure (oom or error, with the child's exception line)."""
    shared = [f"--{key}={getattr(options, key)}" for key in RUN_ARGUMENTS]
    command = [sys.executable, *launcher, os.path.abspath(__file__), "--one", name, *shared, *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    status, error = child_failure(done.stderr)
    recipe, memory_cap_gib = recipe_and_cap(name, options.memory_cap_gib)
    return {"recipe": recipe, **RECIPES.get(recipe, {}), "memory_cap_gib": memory_cap_gib, "status": status,
            "error": error}


def write_json(path: str, header: dict, results: list[dict]) -> None:
    """After each recipe, whole: a reader, or a run stopped mid-write, finds the last complete table."""
    if path:
        write_atomically(Path(path), json.dumps({**header, "results": results}, indent=1))


RUN_ARGUMENTS = ("family", "size", "steps", "warmup", "seq_length", "batch_size", "data", "fim_rate",
                 "memory_cap_gib")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every recipe run takes (RUN_ARGUMENTS, passed on to each run's process), here and in
    bench/ddp_scaling.py; and --json."""
    from finetune.architecture import FAMILIES

    parser.add_argument("--family", default="gpt_bigcode", choices=list(FAMILIES),
                        help="the architecture: gpt_bigcode (StarCoder) or starcoder2; the others are tiny only")
    parser.add_argument("--size", default="15b", help="a size of the family: 15b, 7b, 3b, 1b (StarCoder), tiny")
    parser.add_argument("--steps", type=arguments.at_least(1), default=5, help="measured steps per run")
    parser.add_argument("--warmup", type=arguments.at_least(0), default=2, help="steps excluded from the rates")
    parser.add_argument("--seq_length", type=arguments.at_least(0), default=0,
                        help="override every recipe's sequence length")
    parser.add_argument("--batch_size", type=arguments.at_least(0), default=0,
                        help="override every recipe's batch size")
    parser.add_argument("--data", default="pairs", choices=list(DATA),
                        help="example lengths: pairs (80-600 tokens, CodeAlpaca-like) or files (2,000-8,000 tokens)")
    parser.add_argument("--fim_rate", type=arguments.share, default=0.0, help="share of packed examples in FIM form")
    parser.add_argument("--memory_cap_gib", type=arguments.gib, default=0.0,
                        help="cap each run's GPU memory at this many GiB (a smaller card's, on this one)")
    parser.add_argument("--json", type=arguments.output_file, default="", help="write the header and results here")


def check_run_arguments(parser: argparse.ArgumentParser, options) -> None:
    arguments.check_size(parser, options.family, options.size)
    if options.seq_length == 1:
        parser.error("--seq_length must be 0 (each recipe's own) or at least 2 (a token and the one it predicts)")


def check_recipes(parser: argparse.ArgumentParser, recipes: str) -> None:
    """--recipes, here and in bench/ddp_scaling.py: each entry a recipe of RECIPES, NAME or NAME@GIB."""
    for entry in recipes.split(","):
        try:
            recipe_and_cap(entry, 0.0)
        except ValueError as error:
            parser.error(f"--recipes: {error}")


def main(options) -> list[dict]:
    ceiling = matmul_ceiling()
    header = {**manifest.provenance(), "bf16_matmul_tflops": ceiling}
    print(json.dumps(header))
    results = []
    for name in options.recipes.split(","):
        extra = ["--verify_flops"] if options.verify_flops else []
        extra += ["--profile", options.profile, "--profile_dir", os.path.abspath(options.profile_dir)]
        results.append(run_recipe(name, options, extra=tuple(extra)))
        print(json.dumps(results[-1]), flush=True)
        write_json(options.json, header, results)  # after each recipe: a run cut short keeps what it measured
    notes = f", {options.fim_rate:.0%} of them FIM" if options.fim_rate else ""
    print(f"\n{header['device']}, {options.family}-{options.size} random weights, {options.data} data{notes}, "
          f"{header['date']}, torch {header['versions']['torch']}, bf16 matmul ceiling {ceiling or 0:.0f} TFLOP/s; "
          f"MFU against the dense bf16 peak, MFU8 against the dense FP8 peak; ckpt: layers checkpointed, off: of "
          f"them offloaded instead; cap: the GPU memory a run was given")
    print(f"{'recipe':18s} {'quant':8s} {'batch x seq':>11s} {'ckpt':>5s} {'off':>4s} {'tokens/s':>9s} "
          f"{'TFLOP/s':>8s} {'MFU':>6s} {'MFU8':>6s} {'peak GiB':>8s} {'cap GiB':>7s}")
    for row in results:
        if "tokens_per_second" not in row:
            print(f"{row['recipe']:18s} {row['status']}: {row['error']}")
            continue
        quantization = row.get("quantization", "4bit") + ("+fp8" if row.get("fp8_matmuls") else "")
        print(f"{row['recipe']:18s} {quantization:8s} {row['batch_size']:>4d} x "
              f"{row['seq_length']:<4d} {row.get('checkpointed_layers', 0):>5d} {row.get('offloaded_layers', 0):>4d} "
              f"{row['tokens_per_second']:9.0f} {row['model_tflops']:8.1f} {row.get('mfu', 0):6.1%} "
              f"{row['model_tflops'] / (row.get('fp8_peak_tflops') or math.inf):6.1%} "
              f"{row.get('peak_memory_gib', 0):8.1f} {row['memory_cap_gib'] or '-':>7}")
        if "verify" in row:
            v = row["verify"]
            counted = (f"; FLOPs per token vs FlopCounterMode "
                       f"{v['ours_per_token'] / v['flop_counter_per_token'] - 1:+.2%}" if "ours_per_token" in v else "")
            print(f"  verify: callback {v['callback_model_tflops']:.1f} TFLOP/s vs its FLOPs over CUDA events "
                  f"{v['event_model_tflops']:.1f} ({v['callback_model_tflops'] / v['event_model_tflops'] - 1:+.2%})"
                  + counted)
    return results


if __name__ == "__main__":
    parser = arguments.parser(__doc__)
    add_run_arguments(parser)
    parser.add_argument("--recipes", default="tutorial,qlora,bf16_lora,fast,lean",
                        help=f"from {', '.join(RECIPES)}; NAME@GIB runs one under that much GPU memory (its card's)")
    parser.add_argument("--verify_flops", action="store_true",
                        help="time each recipe's steps with CUDA events too, and count joined recipes' FLOPs with "
                             "FlopCounterMode: independent checks of the callback's TFLOP/s")
    parser.add_argument("--profile", default="",
                        help="recipes to profile the last warm-up step of (comma-separated; needs --warmup 1 or more)")
    parser.add_argument("--profile_dir", type=arguments.output_dir, default=".",
                        help="where the profile tables and timelines go")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one recipe in this process
    options = parser.parse_args()
    check_run_arguments(parser, options)
    check_recipes(parser, options.recipes)
    if options.profile and options.warmup < 1:
        parser.error("--profile profiles the last warm-up step: give --warmup 1 or more")
    if options.one:
        if recipe_and_cap(options.one, 0)[0] not in options.profile.split(","):
            options.profile_dir = ""
        result = run_one(options.one, options)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
    else:
        listed = {recipe_and_cap(entry, 0)[0] for entry in options.recipes.split(",")}
        unlisted = sorted(set(options.profile.split(",")) - listed) if options.profile else []
        if unlisted:
            parser.error(f"--profile {options.profile}: {', '.join(unlisted)} is not in --recipes")
        main(options)
