"""Summarize the mini-replication: read each run's curves.json, write the table (markdown) and the
validation-loss curves (PNG).

Usage: python tools/replicate.py RUNS_DIR [--png bench/results/replication.png] [--table out.md]
RUNS_DIR holds rep_<s|fp>_seed<N>/curves.json as written by tools/device_train.sh.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

RUN_RE = re.compile(r"rep_(?P<variant>s[0-9.]+|fp)_seed(?P<seed>\d+)$")


def load_runs(root: Path) -> dict[str, list[dict]]:
    """variant label -> list of curves (one per seed), variants in a fixed order."""
    runs: dict[str, list[dict]] = {}
    for d in sorted(root.iterdir()):
        m = RUN_RE.match(d.name)
        if not m or not (d / "curves.json").is_file():
            continue
        c = json.loads((d / "curves.json").read_text())
        c["seed"] = int(m["seed"])
        runs.setdefault(m["variant"], []).append(c)
    if not runs:
        raise SystemExit(f"no rep_*_seed*/curves.json under {root}")

    def order(v: str) -> float:
        return -1.0 if v == "fp" else float(v[1:])
    return {v: sorted(runs[v], key=lambda c: c["seed"]) for v in sorted(runs, key=order)}


def label(variant: str) -> str:
    if variant == "fp":
        return "full precision (bf16 weights/activations), S = 0"
    s = float(variant[1:])
    return "ternary, dense (S = 0)" if s == 0 else f"ternary, S = {s:g}"


def table(runs: dict[str, list[dict]]) -> str:
    lines = ["| model | S | final val loss (per seed) | mean | best val loss (mean) | final train loss (mean) "
             "| params | steps | tokens | wall time per run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, cs in runs.items():
        s0 = cs[0]["summary"]
        finals = [c["val"][-1][2] for c in cs]
        bests = [min(r[2] for r in c["val"]) for c in cs]
        trains = [c["train"][-1][2] for c in cs]
        walls = [c["summary"].get("wall_s") or 0 for c in cs]
        s = "0" if variant == "fp" else variant[1:]
        lines.append(
            f"| {label(variant)} | {s} | {', '.join(f'{v:.3f}' for v in finals)} | **{statistics.mean(finals):.3f}** "
            f"| {statistics.mean(bests):.3f} | {statistics.mean(trains):.3f} | {s0['params'] / 1e6:.2f}M "
            f"| {cs[0]['val'][-1][0]} | {cs[0]['val'][-1][1] / 1e6:.1f}M | {min(walls):.0f}-{max(walls):.0f} s |")
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_val, ax_train) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (variant, cs), color in zip(runs.items(), colors):
        for i, c in enumerate(cs):
            style = "-" if i == 0 else "--"
            name = label(variant) if i == 0 else None
            ax_val.plot([r[1] / 1e6 for r in c["val"]], [r[2] for r in c["val"]], style, color=color, label=name)
            ax_train.plot([r[1] / 1e6 for r in c["train"]], [r[2] for r in c["train"]], style, color=color,
                          label=name, linewidth=0.8)
    for ax, title in ((ax_val, "validation loss (held-out works)"), (ax_train, "training loss")):
        ax.set_xlabel("tokens seen (millions)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_val.set_ylim(top=min(5.0, ax_val.get_ylim()[1]))
    ax_train.set_ylim(top=min(5.0, ax_train.get_ylim()[1]))
    ax_val.legend(fontsize=8)
    fig.suptitle("Q-Sparse mini-replication (solid: seed 0, dashed: seed 1)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--png", type=Path, default=Path("bench/results/replication.png"))
    p.add_argument("--table", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    runs = load_runs(args.runs)
    md = table(runs)
    print(md)
    if args.table:
        args.table.write_text(md + "\n")
    plot(runs, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
