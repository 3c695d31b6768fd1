"""Bar chart of tokens/s by recipe from a bench/recipes.py JSON file.

    python bench/plot_recipes.py docs/bench/recipes-15b-h200-2026-11-28.json docs/recipes-15b-h200.png
"""

import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import arguments  # noqa: E402


def measured_rows(results_path: str) -> tuple[dict, list[dict]]:
    """The run's header and its measured rows, slowest first; ValueError for a file bench/recipes.py did not write,
    or one with no measured recipe."""
    try:
        run = json.loads(Path(results_path).read_text())
        rows = [r for r in run["results"] if "tokens_per_second" in r]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{results_path!r} is not a bench/recipes.py JSON file ({error})") from None
    if not rows:
        raise ValueError(f"{results_path!r} holds no measured recipe; nothing to plot")
    return run, sorted(rows, key=lambda r: r["tokens_per_second"])


def plot(run: dict, rows: list[dict], png_path: str) -> None:
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
    parser = arguments.parser(__doc__)
    parser.add_argument("results", help="a bench/recipes.py --json file")
    parser.add_argument("png", type=arguments.output_file, help="the chart to write")
    options = parser.parse_args()
    try:
        run, rows = measured_rows(options.results)
    except ValueError as error:
        parser.error(str(error))
    plot(run, rows, options.png)
