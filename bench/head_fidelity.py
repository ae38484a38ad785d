"""How much the cheaper LM heads change the model's output, against the float head as stored (bf16).

For each model, one forward pass gives the final hidden states of every position; each head variant is then
applied to the same states (so only the head differs), exactly as the decoder computes it:
- int8 head (qsparse_infer/model/head_int8.py): per-row absmax int8 weights, fp32 input;
- the existing `SparsityConfig.lm_head` option at 0.5 and 0.6: the final-normed input top-K masked, float head.
Metrics per variant: top-1 agreement with the float head over all positions, and the logits' relative error
||l - l_ref|| / ||l_ref|| (mean and max over positions).

Models: (a) the built-in Shakespeare model on a Shakespeare passage embedded below (public domain), on the CPU
reference or the GPU decoder; (b) a random model of BitNet-2B4T's shape (qsparse_infer/model/random_model.py) on
random token ids (its weights are random, so no text means anything to it), on the GPU (or the CPU, slowly,
with fewer positions). Writes head-fidelity-<device>.md and .json into --out.

    python bench/head_fidelity.py --device cpu --skip-2b4t            # the built-in model on the CPU
    python bench/head_fidelity.py --device cuda --skip-builtin        # the 2B4T row on the GPU
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from qsparse_infer.atomic_io import write_json, write_text
from qsparse_infer.model.config import topk_count
from qsparse_infer.model.head_int8 import head_source, quantize_head
from qsparse_infer.model.quant import topk_mask

PASSAGE = """HAMLET:
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die, to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep, perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life;
For who would bear the whips and scorns of time,
The oppressor's wrong, the proud man's contumely,
The pangs of despised love, the law's delay,
The insolence of office and the spurns
That patient merit of the unworthy takes,
When he himself might his quietus make
With a bare bodkin? who would fardels bear,
To grunt and sweat under a weary life,
But that the dread of something after death,
The undiscover'd country from whose bourn
No traveller returns, puzzles the will
And makes us rather bear those ills we have
Than fly to others that we know not of?
Thus conscience does make cowards of us all;
And thus the native hue of resolution
Is sicklied o'er with the pale cast of thought,
And enterprises of great pith and moment
With this regard their currents turn awry,
And lose the name of action.

OPHELIA:
Good my lord,
How does your honour for this many a day?

HAMLET:
I humbly thank you; well, well, well.
"""

VARIANTS = ("int8 head", "lm_head sparsity 0.5", "lm_head sparsity 0.6")


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    ref, got = ref.double(), got.double()
    per_pos = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    return {"top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
            "rel_err_mean": float(per_pos.mean()), "rel_err_max": float(per_pos.max())}


def head_variants(normed: torch.Tensor, weight: torch.Tensor,
                  gemv: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits of every head variant for the final-normed states [T, H]. gemv(x, q8) computes x @ head^T with
    the float head (q8 None) or the int8 head q8 = (Q, scales)."""
    h = normed.shape[-1]
    out = {"float head": gemv(normed, None), "int8 head": gemv(normed, quantize_head(weight))}
    for s in (0.5, 0.6):
        out[f"lm_head sparsity {s}"] = gemv(normed * topk_mask(normed, topk_count(h, s)), None)
    return out


def cpu_gemv(weight: torch.Tensor):
    from qsparse_infer.model.head_int8 import int8_head_logits

    def gemv(x: torch.Tensor, q8) -> torch.Tensor:
        return x @ weight.float().t() if q8 is None else int8_head_logits(x, *q8)
    return gemv


def run_reference(ef: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """CPU reference: the final-normed states from the model, then each head by the reference math."""
    from qsparse_infer.model.format import build_reference

    model = build_reference(ef)
    states: dict[str, torch.Tensor] = {}
    hook = model.norm.register_forward_hook(lambda m, i, o: states.setdefault("h", o.detach()))
    with torch.no_grad():
        model(ids)
    hook.remove()
    weight = head_source(ef.tensors)
    with torch.no_grad():
        return head_variants(states["h"], weight, cpu_gemv(weight))


def run_gpu(ef: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPU decoder: the prompt forward through our kernels, then each head through our head kernels."""
    from qsparse_infer.kernels import decode as dk
    from qsparse_infer.gpu.model import GpuModel

    model = GpuModel(ef, max_len=ids.numel() + 1, use_graph=False)
    with torch.no_grad():
        h = model._forward_prompt(ids.to(model.device, torch.int32))
        normed = dk.rmsnorm(h, model.final_norm, model.cfg.rms_norm_eps)
        weight = model.head if model.head is not None else head_source(ef.tensors).to(model.device)

        def gemv(x: torch.Tensor, q8) -> torch.Tensor:
            x = x.contiguous()
            return dk.lm_head(x, weight) if q8 is None else dk.lm_head_int8(x, q8[0], q8[1])
        out = {k: v.cpu() for k, v in head_variants(normed, weight, gemv).items()}
    del model
    torch.cuda.empty_cache()
    return out


def evaluate(name: str, ef: Any, ids: torch.Tensor, device: str, text: str) -> dict[str, Any]:
    logits = run_gpu(ef, ids) if device == "cuda" else run_reference(ef, ids)
    ref = logits["float head"]
    cfg = ef.config
    w = head_source(ef.tensors)
    row = {"model": name, "device": device, "positions": int(ids.numel()), "input": text,
           "float_head_dtype": str(w.dtype).replace("torch.", ""),
           "head_bytes": {"float": w.numel() * w.element_size(), "int8": cfg.vocab_size * (cfg.hidden_size + 4)},
           "variants": {v: compare(ref, logits[v]) for v in VARIANTS}}
    for v, m in row["variants"].items():
        print(f"{name:>10} {v:<22} top-1 {100 * m['top1_agreement']:6.2f}%  rel err mean {m['rel_err_mean']:.2e} "
              f"max {m['rel_err_max']:.2e}", flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# LM head fidelity against the float head", "",
             "Same final hidden states for every variant (one forward pass); top-1 = argmax agreement with the "
             "float head over all positions; rel err = ||logits - float-head logits|| / ||float-head logits|| per "
             "position (mean / max). Written by `bench/head_fidelity.py`.", "",
             "| model | device | positions | input | head variant | head bytes | top-1 agreement | rel err mean | "
             "rel err max |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fb = r["head_bytes"]["float"] / 1e6
        lines.append(f"| {r['model']} | {r['device']} | {r['positions']} | {r['input']} | float "
                     f"({r['float_head_dtype']}), the reference | {fb:.1f} MB | 100% | 0 | 0 |")
        for v, m in r["variants"].items():
            nb = r["head_bytes"]["int8"] / 1e6 if v == "int8 head" else fb
            lines.append(f"| | | | | {v} | {nb:.1f} MB | {100 * m['top1_agreement']:.2f}% | "
                         f"{m['rel_err_mean']:.2e} | {m['rel_err_max']:.2e} |")
    lines += ["", "lm_head sparsity S keeps the top (1 - S) * H channels of the final-normed input (ties: lower "
              "index) and reads only their columns in principle; the current kernel still reads the whole "
              "float head, so its bytes are listed unchanged."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--skip-builtin", action="store_true")
    ap.add_argument("--skip-2b4t", action="store_true")
    ap.add_argument("--random-shape", default="2b4t", help="random_model.SHAPES key for row (b)")
    ap.add_argument("--positions", type=int, default=None,
                    help="token positions of the random model (default 512 on the GPU, 48 on the CPU)")
    args = ap.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    if not args.skip_builtin:
        from qsparse_infer.engine import BUILTIN_MODEL
        from qsparse_infer.model.format import read_engine
        from qsparse_infer.model.tokenizer import Tokenizer

        ef = read_engine(BUILTIN_MODEL)
        tok = Tokenizer.from_engine_file(ef)
        ids = torch.tensor(tok.encode(PASSAGE)[: ef.config.max_seq_len], dtype=torch.int64)
        rows.append(evaluate("built-in", ef, ids, device, "Hamlet III.1 (embedded)"))
    if not args.skip_2b4t:
        from qsparse_infer.model.random_model import SHAPES, random_engine

        cfg = SHAPES[args.random_shape]
        n = args.positions or (512 if device == "cuda" else 48)
        ef = random_engine(cfg, device=device, seed=0)
        if device == "cpu":
            print(f"{args.random_shape} on the CPU reference: slow (minutes) and memory-hungry", file=sys.stderr)
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1))
        rows.append(evaluate(f"random {args.random_shape}", ef, ids, device, "random ids"))
        del ef
    if not rows:
        print("nothing to do (both rows skipped)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu"
    if device == "cuda":
        from qsparse_infer.bench.e2e import card_slug

        tag = card_slug(torch.cuda.get_device_name())
    write_json(out / f"head-fidelity-{tag}.json", {"rows": rows})
    write_text(out / f"head-fidelity-{tag}.md", markdown(rows))
    print(markdown(rows))
    print(f"wrote {out}/head-fidelity-{tag}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
