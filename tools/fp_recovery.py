"""Summarize the full-precision recovery experiment (docs/TRAINING.md, "Full precision"): the dense finetune and
the sparse finetunes of the same start on the same token budget, from their curves.json.

The start's training-free loss at S is each sparse run's step-0 validation loss; the start's dense loss is the dense
run's step 0. Loss lost training-free: L(start, S) - L(start, 0). Left after the finetunes: L(sparse ft, S) -
L(dense ft, 0). Recovered: 1 - left / lost (the issue's target at S = 0.5: at least one half).

Usage: python tools/fp_recovery.py --dense runs/llama-ft-dense --sparse 0.5=runs/llama-ft-s05 [--sparse 0.7=...]
       [--out bench/results/fp-recovery-cpu]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folder: str) -> dict:
    return json.loads((Path(folder) / "curves.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", required=True)
    p.add_argument("--sparse", action="append", required=True, help="S=FOLDER (repeatable)")
    p.add_argument("--out", default="bench/results/fp-recovery-cpu")
    args = p.parse_args()
    dense = load(args.dense)
    d0, d1 = dense["val"][0], dense["val"][-1]
    assert d0[0] == 0, "the dense run has no step-0 validation (made before --init-from recorded it?)"
    rows, curves = [], {"dense (S = 0)": dense["val"]}
    for spec in args.sparse:
        s, folder = spec.split("=", 1)
        c = load(folder)
        s0, s1 = c["val"][0], c["val"][-1]
        assert s1[1] == d1[1], f"token budgets differ: {s1[1]} vs {d1[1]}"
        lost, left = s0[2] - d0[2], s1[2] - d1[2]
        rows.append({"S": float(s), "start_dense": d0[2], "start_sparse": s0[2], "ft_dense": d1[2], "ft_sparse": s1[2],
                     "lost": lost, "left": left, "recovered": 1 - left / lost if lost > 0 else None,
                     "tokens": s1[1]})
        curves[f"sparse S = {s}"] = c["val"]
    lines = ["# Full-precision Q-Sparse: training-free loss and recovery by a sparse finetune (CPU)", "",
             f"Start: the small dense Llama of docs/TRAINING.md; both finetunes {d1[1]:,} tokens, same data, schedule and "
             "seed; validation loss on the same held-out windows (nats per token).", "",
             "| S | start, S = 0 | start, S (training-free) | lost | dense ft, S = 0 | sparse ft, S | left | recovered |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = "-" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%"
        lines.append(f"| {r['S']:g} | {r['start_dense']:.4f} | {r['start_sparse']:.4f} | {r['lost']:+.4f} | "
                     f"{r['ft_dense']:.4f} | {r['ft_sparse']:.4f} | {r['left']:+.4f} | {rec} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "curves": curves}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, pts in curves.items():
        ax.plot([t for _, t, _ in pts], [v for _, _, v in pts], "o-", label=label, ms=3)
    ax.set_xlabel("finetune tokens")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("dense vs sparse finetune of the same dense start")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
