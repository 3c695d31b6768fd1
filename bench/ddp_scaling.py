"""DDP scaling: one recipe on 1 GPU and on N GPUs at the same per-GPU batch, and the scaling efficiency.

    python bench/ddp_scaling.py --size 15b --recipes fast,qlora --gpus 1,2 --json scaling.json   # a 2-GPU machine
    python bench/ddp_scaling.py --size tiny --recipes fast --gpus 1,2 --steps 2                  # CPU check (gloo)

Each (recipe, GPU count) trains in its own `torchrun --nproc_per_node N` job through bench/recipes.py: StarCoder's
architecture with random weights, the real Trainer and TFLOPSCallback. Every rank builds the same weights on its own
GPU, LoRA gradients are all-reduced by DDP. Efficiency = world tokens/s on N GPUs / (N x tokens/s on one GPU); the
step time of a DDP step is the slowest rank's, so the all-reduce and any straggler count against it.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.recipes import environment  # noqa: E402


def run(recipe: str, gpus: int, options) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               "bench/recipes.py", "--one", recipe, "--size", options.size, "--steps", str(options.steps),
               "--warmup", str(options.warmup), "--seq_length", str(options.seq_length)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        error = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no output"]
        return {"recipe": recipe, "gpus": gpus, "status": "error", "error": error[0][:300]}
    result = json.loads(lines[-1])
    return {"gpus": gpus, **result, "world_tokens_per_second": result.get("world_tokens_per_second",
                                                                          result["tokens_per_second"])}


def main(options) -> list[dict]:
    header = environment()
    print(json.dumps(header))
    results = []
    for recipe in options.recipes.split(","):
        single = None
        for gpus in [int(n) for n in options.gpus.split(",")]:
            row = run(recipe, gpus, options)
            if "world_tokens_per_second" in row:
                single = single or (row["world_tokens_per_second"] if gpus == 1 else None)
                row["efficiency"] = row["world_tokens_per_second"] / (gpus * single) if single else None
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{header['gpu']} x{header['gpu_count']}, StarCoder-{options.size} random weights, {header['date']}")
    print(f"{'recipe':10s} {'GPUs':>4s} {'batch/GPU':>9s} {'tokens/s/GPU':>12s} {'world tokens/s':>14s} {'MFU':>6s} "
          f"{'peak GiB':>8s} {'efficiency':>10s}")
    for row in results:
        if "world_tokens_per_second" not in row:
            print(f"{row['recipe']:10s} {row['gpus']:>4d} {row['status']}: {row['error']}")
            continue
        efficiency = f"{row['efficiency']:.1%}" if row.get("efficiency") else "-"
        print(f"{row['recipe']:10s} {row['gpus']:>4d} {row['batch_size']:>9d} {row['tokens_per_second']:12.0f} "
              f"{row['world_tokens_per_second']:14.0f} {row.get('mfu', 0):6.1%} {row.get('peak_memory_gib', 0):8.1f} "
              f"{efficiency:>10s}")
    if options.json:
        with open(options.json, "w") as f:
            json.dump({**header, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="15b", choices=["15b", "7b", "3b", "1b", "tiny"])
    parser.add_argument("--recipes", default="fast", help="recipes of bench/recipes.py, comma-separated")
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run; 1 must come first, as the baseline")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps excluded from the rates")
    parser.add_argument("--seq_length", type=int, default=0, help="override the recipes' sequence length")
    parser.add_argument("--json", default="")
    main(parser.parse_args())
