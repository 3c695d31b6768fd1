"""FP8 must not change what is learned: the same fine-tune with the frozen base's matmuls in bf16 and in FP8, step by
step.

    python bench/starcoder_shapes.py --size 1b --save /tmp/starcoder-1b        # a GPU with FP8 (>= 8.9)
    python bench/fp8_quality.py --model /tmp/starcoder-1b --steps 200 --json fp8.json --plot fp8.png
    python bench/fp8_quality.py --model /tmp/starcoder-1b --base 4bit            # lean against lean_fp8

Each run is the training script itself, on the embedded `stdlib-code` (real text) packed into 2048-token blocks, 4
per step, same seed: `--quantization none` against `fp8` (a 16-bit base against one stored in FP8), or with `--base
4bit` an NF4 base without and with `--fp8_matmuls`. The runs differ only in how the base's matmuls are computed.
Training losses come from the final checkpoint's log, held-out losses from manifest.json; the table gives the largest
relative difference over the logged steps and at the end.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench import arguments  # noqa: E402
from bench.recipes import write_json  # noqa: E402
from finetune import checkpointing, manifest  # noqa: E402
from finetune.errors import child_failure  # noqa: E402


# The two runs compared, by the dtype their base's matmuls run in, for each storage of the base (--base).
RUNS = {"16bit": {"bf16": ["--quantization", "none"], "fp8": ["--quantization", "fp8"]},
        "4bit": {"bf16": ["--quantization", "4bit"], "fp8": ["--quantization", "4bit", "--fp8_matmuls"]}}


def train(model: str, flags: list[str], steps: int, directory: str) -> dict:
    command = [sys.executable, "base_with_tflops.py", "--model", model, "--dataset", "stdlib-code", "--packing",
               "--seq_length", "2048", "--batch_size", "4", "--max_train_steps", str(steps), "--logging_steps", "10",
               "--eval_steps", str(steps), *flags, "--report_to", "none", "--output_dir", directory]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(flags)}: {child_failure(done.stderr)[1]}")
    state = json.loads((checkpointing.complete_checkpoints(directory)[-1] / "trainer_state.json").read_text())
    metrics = json.loads(open(os.path.join(directory, "manifest.json")).read())["metrics"]
    return {"losses": {row["step"]: row["loss"] for row in state["log_history"] if "loss" in row},
            "held_out_loss": metrics["adapter_loss"], "base_loss": metrics["base_loss"],
            "tokens_per_second": metrics.get("tokens_per_second")}


def plot(runs: dict, base: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        steps = sorted(run["losses"])
        axes.plot(steps, [run["losses"][step] for step in steps], marker=".", label=f"base's matmuls in {name}")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_title(f"LoRA on StarCoder-1B shape, {base} base, stdlib-code packed 4 x 2048: bf16 vs FP8 matmuls",
                   fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(options) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        runs = {name: train(options.model, flags, options.steps, os.path.join(scratch, name))
                for name, flags in RUNS[options.base].items()}
    bf16, fp8 = runs["bf16"], runs["fp8"]
    differences = {step: abs(fp8["losses"][step] / bf16["losses"][step] - 1) for step in bf16["losses"]}
    worst = max(differences, key=differences.get)
    held_out = abs(fp8["held_out_loss"] / bf16["held_out_loss"] - 1)
    header = manifest.provenance()
    print(f"{header['device']}, {options.model}, {options.base} base, {options.steps} steps, losses logged every 10")
    print(f"{'step':>5s} {'bf16 loss':>10s} {'fp8 loss':>10s} {'difference':>10s}")
    for step in sorted(bf16["losses"]):
        print(f"{step:5d} {bf16['losses'][step]:10.4f} {fp8['losses'][step]:10.4f} {differences[step]:10.3%}")
    print(f"largest training-loss difference: {differences[worst]:.3%} (step {worst}); held-out loss: bf16 "
          f"{bf16['held_out_loss']:.4f}, fp8 {fp8['held_out_loss']:.4f} ({held_out:.3%})")
    if options.plot:
        plot(runs, options.base, options.plot)
    summary = {"largest_training_difference": differences[worst], "at_step": worst, "held_out_difference": held_out}
    write_json(options.json, {**header, "model": options.model, "base": options.base, "steps": options.steps,
                              **summary}, runs)
    return summary


if __name__ == "__main__":
    parser = arguments.parser(__doc__)
    parser.add_argument("--model", required=True, help="a StarCoder checkpoint directory (bench/starcoder_shapes.py)")
    parser.add_argument("--base", default="16bit", choices=list(RUNS),
                        help="16bit: a bf16 base against an FP8 one; 4bit: an NF4 base's matmuls in bf16 and in FP8")
    parser.add_argument("--steps", type=arguments.at_least(10), default=200, help="losses are logged every 10")
    parser.add_argument("--json", type=arguments.output_file, default="")
    parser.add_argument("--plot", type=arguments.output_file, default="")
    options = parser.parse_args()
    if not os.path.isfile(os.path.join(options.model, "config.json")):
        parser.error(f"--model {options.model!r} holds no config.json; write one with bench/starcoder_shapes.py")
    main(options)
