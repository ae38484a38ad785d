"""Summarize the full-precision recovery experiment (docs/TRAINING.md, "Full precision"): the dense finetune and
the sparse finetunes of the same start on the same token budget, from their curves.json.

The start's training-free loss at S is each sparse run's step-0 validation loss; the start's dense loss is the dense
run's step 0. Loss lost training-free: L(start, S) - L(start, 0). Left after the finetunes: L(sparse ft, S) -
L(dense ft, 0). Recovered: 1 - left / lost (the issue's target at S = 0.5: at least one half).

Usage: python tools/fp_recovery.py --dense runs/llama-ft-dense --sparse 0.5=runs/llama-ft-s05 [--sparse 0.7=...]
       (seeds: --dense A0 --dense A1 --sparse 0.5=B0 --sparse 0.5=B1, finetune i of each kind with --seed i)
       [--out bench/results/fp-recovery-cpu]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folder: str) -> dict:
    return json.loads((Path(folder) / "curves.json").read_text())


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", action="append", required=True,
                   help="a dense finetune's folder (repeatable: one per seed, in seed order)")
    p.add_argument("--sparse", action="append", required=True,
                   help="S=FOLDER (repeatable; several folders at one S are its seeds, paired in order with --dense)")
    p.add_argument("--out", default="bench/results/fp-recovery-cpu")
    args = p.parse_args()
    denses = [load(f)["val"] for f in args.dense]
    for dv in denses:
        assert dv[0][0] == 0, "a dense run has no step-0 validation (made before --init-from recorded it?)"
    by_s: dict[str, list[list]] = {}
    for spec in args.sparse:
        s, folder = spec.split("=", 1)
        by_s.setdefault(s, []).append(load(folder)["val"])
    rows, curves = [], {}
    for i, dv in enumerate(denses):
        curves[f"dense (S = 0){f', seed {i}' if len(denses) > 1 else ''}"] = dv
    for s, runs in by_s.items():
        if len(runs) > len(denses):
            raise SystemExit(f"S = {s} has {len(runs)} runs but there are {len(denses)} dense ones to pair them with")
        per_seed = []
        for dv, sv in zip(denses, runs):
            assert sv[-1][1] == dv[-1][1], f"token budgets differ: {sv[-1][1]} vs {dv[-1][1]}"
            lost, left = sv[0][2] - dv[0][2], sv[-1][2] - dv[-1][2]
            per_seed.append({"start_dense": dv[0][2], "start_sparse": sv[0][2], "ft_dense": dv[-1][2],
                             "ft_sparse": sv[-1][2], "lost": lost, "left": left,
                             "recovered": 1 - left / lost if lost > 0 else None})
        # the mean over seeds of each loss, then lost / left / recovered from those means
        r = {k: mean([x[k] for x in per_seed]) for k in ("start_dense", "start_sparse", "ft_dense", "ft_sparse")}
        lost, left = r["start_sparse"] - r["start_dense"], r["ft_sparse"] - r["ft_dense"]
        rows.append({"S": float(s), **r, "lost": lost, "left": left,
                     "recovered": 1 - left / lost if lost > 0 else None, "tokens": runs[0][-1][1],
                     "seeds": len(per_seed), "per_seed": per_seed})
        for i, sv in enumerate(runs):
            curves[f"sparse S = {s}{f', seed {i}' if len(runs) > 1 else ''}"] = sv
    d1 = denses[0][-1]
    lines = ["# Full-precision Q-Sparse: training-free loss and recovery by a sparse finetune (CPU)", "",
             f"Start: the small dense Llama of docs/TRAINING.md; both finetunes {d1[1]:,} tokens, same data, schedule and "
             "seed (per pair); validation loss on the same held-out windows (nats per token).", "",
             "With several seeds, each loss is the mean over the seeds (finetune i of each kind uses seed i), and lost, "
             "left and recovered come from those means; the per-seed recoveries follow.", "",
             "| S | seeds | start, S = 0 | start, S (training-free) | lost | dense ft, S = 0 | sparse ft, S | left | "
             "recovered | per seed |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"
    for r in rows:
        lines.append(f"| {r['S']:g} | {r['seeds']} | {r['start_dense']:.4f} | {r['start_sparse']:.4f} | "
                     f"{r['lost']:+.4f} | {r['ft_dense']:.4f} | {r['ft_sparse']:.4f} | {r['left']:+.4f} | "
                     f"{pct(r['recovered'])} | {', '.join(pct(x['recovered']) for x in r['per_seed'])} |")
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
