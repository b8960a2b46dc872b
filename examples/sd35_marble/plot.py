#!/usr/bin/env python
"""Reward, weight and cosine curves (PNG) from one or more runs' ``metrics.jsonl``.

Usage::

    python examples/sd35_marble/plot.py runs/marble runs/ws --labels MARBLE "weighted sum" \
        --out curves.png --smooth 10

Each argument is a run directory (or a ``metrics.jsonl`` file). The figure has one column
per reward and three rows: the reward's batch mean (a moving average over ``--smooth``
steps, the raw values faint behind it), the weight α the run gave the reward, and the
cosine between the update and the reward's gradient (``cosine/<name>``). Runs share colours
across panels.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["load_metrics", "main", "moving_average", "plot_runs"]


def load_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def moving_average(values: Sequence[float | None], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (NaN where there is none)."""
    out, buf = [], []
    for v in values:
        if v is not None and math.isfinite(v):
            buf.append(v)
        buf = buf[-window:]
        out.append(sum(buf) / len(buf) if buf else math.nan)
    return out


def reward_names(rows: list[dict]) -> list[str]:
    return [k.split("/", 1)[1] for k in rows[0] if k.startswith("reward/")]


def plot_runs(
    runs: Sequence[list[dict]],
    labels: Sequence[str],
    out: str | Path,
    *,
    smooth: int = 10,
    title: str | None = None,
    dpi: int = 80,
    palette: int = 0,
) -> Path:
    """Draw the figure for ``runs`` (lists of metric rows) and save it to ``out``.

    ``palette``: quantize the PNG to that many colours (a 3–4× smaller file); 0 keeps it as is.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = reward_names(runs[0])
    for rows, label in zip(runs, labels):
        if reward_names(rows) != names:
            raise ValueError(f"run {label!r} has rewards {reward_names(rows)}, the first run {names}")
    panels = [("reward", "reward (batch mean)"), ("weight", "weight α"), ("cosine", "cos(update, ∇L_k)")]
    fig, axes = plt.subplots(
        len(panels), len(names), figsize=(3.2 * len(names), 2.4 * len(panels)), squeeze=False, sharex=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, name in enumerate(names):
        for row, (prefix, ylabel) in enumerate(panels):
            ax = axes[row][col]
            for i, (rows, label) in enumerate(zip(runs, labels)):
                steps = [r["step"] for r in rows]
                values = [r.get(f"{prefix}/{name}") for r in rows]
                color = colors[i % len(colors)]
                if prefix == "reward":
                    raw = [math.nan if v is None else v for v in values]
                    ax.plot(steps, raw, color=color, alpha=0.2, linewidth=0.8)
                ax.plot(steps, moving_average(values, smooth), color=color, label=label, linewidth=1.5)
            if prefix == "cosine":
                ax.axhline(0.0, color="black", linewidth=0.6)
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == len(panels) - 1:
                ax.set_xlabel("optimizer step")
            ax.tick_params(labelsize=8)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    if palette:
        from PIL import Image

        with Image.open(out) as img:
            small = img.convert("RGB").quantize(colors=palette, method=Image.Quantize.MEDIANCUT)
        small.save(out, optimize=True)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    parser.add_argument("--labels", nargs="+", help="legend labels, one per run (default: directory names)")
    parser.add_argument("--out", default="curves.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window in steps (default: %(default)s)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--dpi", type=int, default=80, help="resolution (default: %(default)s)")
    parser.add_argument("--palette", type=int, default=0, help="quantize to N colours for a small file (0: off)")
    args = parser.parse_args(argv)
    labels = args.labels or [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    if args.smooth < 1:
        parser.error("--smooth must be >= 1")
    try:
        runs = [load_metrics(r) for r in args.runs]
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    if not 0 <= args.palette <= 256:
        parser.error("--palette must be in 0..256")
    out = plot_runs(runs, labels, args.out, smooth=args.smooth, title=args.title, dpi=args.dpi, palette=args.palette)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
