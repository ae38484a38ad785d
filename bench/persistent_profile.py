"""Inside the persistent decode step (issue 16), lab version: per-op table and timeline PNG of one step per
(sparsity, L2 prefetch on/off), from qsparse_infer/bench/step_profile.py.

    python bench/persistent_profile.py --shape 2b4t --sparsity 0,0.6 --prefetch on,off --out bench/results
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qsparse_infer.bench.e2e import card_slug
from qsparse_infer.bench.step_profile import markdown_lines, plot_timelines, profile_persistent
from qsparse_infer.kernels.ceilings import streaming_gbps
from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.random_model import SHAPES, random_engine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=tuple(SHAPES), default="2b4t")
    ap.add_argument("--sparsity", default="0,0.6")
    ap.add_argument("--prefetch", default="off", help="on, off or on,off (off: the default of PersistentStep)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    gbps = streaming_gbps()["streaming_gbps"]
    ef = random_engine(SHAPES[args.shape], device="cuda", seed=0)
    prompt = torch.randint(0, ef.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1))
    name = torch.cuda.get_device_name()
    res = {"card": name, "model": args.shape, "streaming_gbps": gbps, "runs": {}}
    for s in [float(x) for x in args.sparsity.split(",")]:
        for pf in args.prefetch.split(","):
            key = f"S={s:g}" + (" prefetch" if pf == "on" else "")
            r = profile_persistent(ef, SparsityConfig.uniform(s), prompt, gbps, torch.bfloat16, prefetch=pf == "on")
            res["runs"][key] = r
            print(f"{key}: layers {r['layers_us_median']:.1f} us; " + ", ".join(
                f"{n} {t['critical_us']:.2f}" for n, t in r["per_op"].items()), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"persistent-profile-{args.shape}-{card_slug(name)}"
    lines = [f"# Inside the persistent decode step: {args.shape} on {name}", "",
             f"Streaming ceiling {gbps:.0f} GB/s (same run). Columns: qsparse_infer/bench/step_profile.py.", ""]
    for key, r in res["runs"].items():
        lines += markdown_lines(key, r)
    for r in res["runs"].values():  # ~20k bars: 3 decimals of a microsecond keep the file small
        r["timeline"] = [[sm, round(t0, 3), round(dur, 3), n] for sm, t0, dur, n in r["timeline"]]
    (out / f"{stem}.json").write_text(json.dumps(res, separators=(",", ":")))
    (out / f"{stem}.md").write_text("\n".join(lines))
    plot_timelines(res["runs"], args.shape, out / f"{stem}.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
