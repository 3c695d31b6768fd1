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
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import arguments  # noqa: E402
from bench.recipes import add_run_arguments, check_recipes, check_run_arguments, run_recipe, write_json  # noqa: E402
from finetune import manifest  # noqa: E402


def run(recipe: str, gpus: int, options) -> dict:
    result = run_recipe(recipe, options, launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                                   str(gpus)))
    if "tokens_per_second" not in result:
        return {"gpus": gpus, **result}
    # One process reports no world_* values: the world is that one GPU.
    return {"gpus": gpus, **result, "world_tokens_per_second": result.get("world_tokens_per_second",
                                                                          result["tokens_per_second"])}


def gpu_counts(text: str) -> list[int]:
    counts = [arguments.at_least(1)(part) for part in text.split(",")]
    if counts[0] != 1 or len(set(counts)) < len(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 first (the baseline), then other GPU counts once each")
    return counts


def main(options) -> list[dict]:
    header = manifest.provenance()
    print(json.dumps(header))
    results = []
    for recipe in options.recipes.split(","):
        single = None
        for gpus in options.gpus:
            row = run(recipe, gpus, options)
            if "world_tokens_per_second" in row:
                single = single or (row["world_tokens_per_second"] if gpus == 1 else None)
                row["efficiency"] = row["world_tokens_per_second"] / (gpus * single) if single else None
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{header['device']} x{header['gpu_count']}, {options.family}-{options.size} random weights, "
          f"{header['date']}")
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
    write_json(options.json, header, results)
    return results


if __name__ == "__main__":
    parser = arguments.parser(__doc__)
    add_run_arguments(parser)
    parser.set_defaults(steps=6)
    parser.add_argument("--recipes", default="fast", help="recipes of bench/recipes.py, comma-separated")
    parser.add_argument("--gpus", type=gpu_counts, default="1,2",
                        help="GPU counts to run; 1 must come first, as the baseline")
    options = parser.parse_args()
    check_run_arguments(parser, options)
    check_recipes(parser, options.recipes)
    main(options)
