"""Bar chart of tokens/s by recipe from a bench/recipes.py JSON file.

    python bench/plot_recipes.py docs/bench/recipes-15b-h200-2026-11-28.json docs/recipes-15b-h200.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(results_path: str, png_path: str) -> None:
    run = json.load(open(results_path))
    rows = sorted((r for r in run["results"] if "tokens_per_second" in r), key=lambda r: r["tokens_per_second"])
    figure, axes = plt.subplots(figsize=(8, 4.5))
    ours = ("fast", "fp8", "lean")  # the recipes of docs/PERFORMANCE.md; the rest are the references
    bars = axes.barh([r["recipe"] for r in rows], [r["tokens_per_second"] for r in rows],
                     color=["tab:green" if r["recipe"].startswith(ours) else "tab:gray" for r in rows])
    for bar, row in zip(bars, rows):
        axes.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                  f" {row['tokens_per_second']:,.0f}  ({row.get('mfu', 0):.0%} MFU, {row['peak_memory_gib']:.0f} GiB)",
                  va="center", fontsize=8)
    axes.set_xlabel("tokens/s (non-padding)")
    axes.set_xlim(0, max(r["tokens_per_second"] for r in rows) * 1.45)
    axes.set_title(f"StarCoder-15B LoRA r=16, {run['device']}, {run['date']} (bench/recipes.py)", fontsize=10)
    figure.tight_layout()
    figure.savefig(png_path, dpi=110)


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
