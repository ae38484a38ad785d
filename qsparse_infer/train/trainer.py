"""`qsparse train`: Q-Sparse quantization-aware training from scratch (BitNet b1.58 + top-K sparsity).

The model is exactly the reference architecture, `reference.Transformer(cfg, sparsity,
make_linear=QSparseLinear)`: only the projection class differs. QSparseLinear keeps a latent fp32 weight
and, in its forward pass, applies the same math as `quant.bitlinear` (absmean ternary weights, top-K
mask on |x| with ties to the lower index, per-token absmax int8 activations), with straight-through
estimators (STE) so the gradient flows to the latent weight and to every input channel, masked or not
(as in the Q-Sparse paper).

The reference forward takes one sequence ([T] ids); a batch runs it under `torch.vmap`, so training does
not need a second, batched copy of the architecture that could drift from the spec.

Output folder (what `qsparse convert` reads): `config.json` (architectures ["QSparseForCausalLM"] and
the qsparse model/sparsity configs), `model.safetensors` (the Transformer state_dict), `tokenizer.model`;
plus `trainer_state.pt` (for --resume), `training.json` and `curves.json`.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model.config import ModelConfig, SparsityConfig, check_topk
from ..model.quant import ABSMAX_EPS, WEIGHT_EPS, l2_rescale
from ..model.reference import Transformer

ARCHITECTURE = "QSparseForCausalLM"
# Relative to the repo root (or site-packages), where train_data.resolve_corpus also looks: the shipped archive.
DEFAULT_CORPUS = "qsparse_infer/data/shakespeare-corpus.tar.xz"
# fp32 latent weights are kept in model.safetensors only while the file stays below this size.
FP32_FILE_LIMIT = 16 * 1024 * 1024
INIT_STD = 0.02

# ---------------------------------------------------------------------------------------------
# Straight-through estimators
# ---------------------------------------------------------------------------------------------


def ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward: `value`; backward: the identity to `x` (the straight-through estimator)."""
    return x + (value - x).detach()


def topk_keep_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |x| on the last dim, ties to the lower index (quant.topk_mask's
    rule: a stable descending sort keeps equal keys in index order). Written without in-place writes
    into a fresh tensor so that it also runs under torch.vmap."""
    d = x.shape[-1]
    if not 0 <= k <= d:
        raise ValueError(f"k={k} out of range for dimension {d}")
    keys = x.detach().float().abs()
    if k == d:
        return torch.ones_like(keys, dtype=torch.bool)
    order = torch.sort(keys, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(keys, dtype=torch.bool).scatter(-1, order, True)


def sparsify_ste(x: torch.Tensor, k: int, rescale: str = "none") -> torch.Tensor:
    """Top-K sparsification whose gradient passes through the mask to ALL inputs (Q-Sparse's STE):
    forward keeps the k largest |x| per row and zeros the rest (then, with rescale "l2", multiplies them by
    ||x|| / ||kept||: quant.sparsify_topk's value); backward is the identity."""
    if k >= x.shape[-1]:
        return x
    kept = torch.where(topk_keep_mask(x, k), x, torch.zeros_like(x))
    if rescale == "l2":
        kept = kept * l2_rescale(x.detach(), kept.detach())
    return ste(x, kept)


class QSparseLinear(nn.Module):
    """Training-time BitLinear with a latent weight [out, in] and top-K input sparsity.

    Forward equals quant.bitlinear(x, T, beta, k) with (T, beta) = quant.ternarize_absmean(weight):
      beta = mean|W|, T = clip(round(W / beta), -1, 1); gamma = max(max|x|, eps) per token,
      q = clip(round(x * 127 / gamma), -128, 127) on the top-k channels, y = (q @ T^T) * gamma*beta/127.
    The matmul runs on the integer-valued q and T (exact in bf16), so autocast loses nothing before the
    accumulation. Backward (STE): dy/dx = beta*T (through quantizer and mask), dy/dW = x_q.
    `ternary=False, int8=False` gives the full-precision baseline (plain linear, same mask).
    """

    def __init__(self, in_features: int, out_features: int, *, ternary: bool = True, int8: bool = True,
                 rescale: str = "none") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=INIT_STD)
        self.k = in_features  # set by Transformer.set_sparsity
        self.ternary, self.int8 = ternary, int8
        if rescale != "none" and (ternary or int8):
            raise ValueError("the L2 re-scale after the top-K is for full-precision projections")
        self.rescale = rescale

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, k={self.k}, "
                f"ternary={self.ternary}, int8={self.int8}")

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T with the STE to the latent weight, beta). beta is a constant of the backward pass."""
        w = self.weight.float()
        beta = w.detach().abs().mean().clamp(min=WEIGHT_EPS)
        w_scaled = w * (1.0 / beta)  # same expression as quant.ternarize_absmean, so ties round alike
        return ste(w_scaled, torch.round(w_scaled).clamp(-1, 1)), beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        sparse = self.k < x.shape[-1]
        if self.ternary:
            w, beta = self.quantized_weight()
        else:
            w, beta = self.weight, None
        if self.int8:
            gamma = x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=ABSMAX_EPS)
            x_scaled = x * (127.0 / gamma)
            q = torch.round(x_scaled).clamp(-128, 127)
            if sparse:
                q = torch.where(topk_keep_mask(x, self.k), q, torch.zeros_like(q))
            y = F.linear(ste(x_scaled, q), w)
            scale = gamma / 127.0 if beta is None else gamma * beta / 127.0
            return y.float() * scale
        xs = sparsify_ste(x, self.k, self.rescale) if sparse else x
        y = F.linear(xs, w).float()
        return y if beta is None else y * beta


PRECISIONS = {"ternary": dict(ternary=True, int8=True), "fp": dict(ternary=False, int8=False)}


def build_model(cfg: ModelConfig, sparsity: SparsityConfig, precision: str = "ternary") -> Transformer:
    """The reference Transformer with QSparseLinear projections and trainable embeddings/norms (a
    full-precision config, cfg.precision "bf16", always trains full-precision projections)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if cfg.precision != "ternary":
        precision = "fp"
    model = Transformer(cfg, sparsity, make_linear=functools.partial(
        QSparseLinear, **PRECISIONS[precision], **({"rescale": cfg.topk_rescale} if precision == "fp" else {})))
    nn.init.normal_(model.embed, std=INIT_STD)
    if model.lm_head is not None:
        nn.init.normal_(model.lm_head, std=INIT_STD)
    return model


def batched_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] ids -> [B, T, V] logits: the reference forward, vmapped over the batch."""
    return torch.vmap(model)(ids)


def lm_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = batched_logits(model, x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def hf_config(cfg: ModelConfig, sparsity: SparsityConfig) -> dict:
    return {"architectures": [ARCHITECTURE], "qsparse": {"model": cfg.to_dict(), "sparsity": sparsity.to_dict()}}


def choose_save_dtype(model: nn.Module, requested: str) -> torch.dtype:
    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        return torch.bfloat16
    return torch.float32 if count_params(model) * 4 < FP32_FILE_LIMIT else torch.bfloat16


def save_model_folder(folder: Path, model: Transformer, tokenizer_bytes: bytes, dtype: torch.dtype,
                      extra: dict | None = None) -> None:
    """Write config.json + model.safetensors + tokenizer.model (+ training.json) atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config(model.cfg, model.sparsity), indent=2) + "\n")
    (tmp / "tokenizer.model").write_bytes(tokenizer_bytes)
    if extra is not None:
        (tmp / "training.json").write_text(json.dumps(extra, indent=2) + "\n")
    # Keep files the trainer writes beside the model (trainer_state.pt, curves.json, logs).
    if folder.exists():
        for name in ("config.json", "model.safetensors", "tokenizer.model", "training.json"):
            (folder / name).unlink(missing_ok=True)
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
        tmp.rmdir()
    else:
        os.replace(tmp, folder)


def load_model_folder(folder: str | Path, precision: str = "ternary") -> tuple[Transformer, bytes]:
    """Read a folder written by save_model_folder back into a training model (fp32 latent weights)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found")
    config = json.loads(config_path.read_text())
    if config.get("architectures") != [ARCHITECTURE]:
        raise ValueError(f"{config_path}: architectures must be [{ARCHITECTURE!r}], got {config.get('architectures')}")
    cfg = ModelConfig.from_dict(config["qsparse"]["model"])
    sparsity = SparsityConfig.from_dict(config["qsparse"]["sparsity"])
    model = build_model(cfg, sparsity, precision)
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return model, (folder / "tokenizer.model").read_bytes()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass
class Schedule:
    lr: float
    warmup: int
    steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        """Linear warmup, then cosine decay to lr * min_ratio at the last step."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on the projection (latent) weights only, not on embeddings or norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and name != "embed" and name != "lm_head" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if next(model.parameters()).is_cuda else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kwargs)


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: Transformer, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device) -> float:
    """Mean token loss over all validation windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        with autocast(device):
            logits = batched_logits(model, xb)
        total += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), yb.reshape(-1),
                                 reduction="sum").item()
        count += yb.numel()
    model.train()
    return total / count


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    if args.hidden % args.heads:
        raise ValueError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    return ModelConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_seq_len=args.seq_len, activation="relu2",
        attn_sub_norm=True, ffn_sub_norm=True, tie_word_embeddings=not args.untied)


def _training_args(args: argparse.Namespace) -> dict:
    skip = {"func", "command", "resume", "stop_at_step", "max_minutes"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def prepare_data(args: argparse.Namespace, out: Path):
    """Corpus -> (tokenizer bytes, train stream, validation windows, description)."""
    from . import data as td

    works = td.load_works(args.data)
    val_names = [n.strip() for n in args.val_works.split(",") if n.strip()]
    train_works, val_works = td.split_works(works, val_names)
    if args.tokenizer:
        tok_bytes = Path(args.tokenizer).read_bytes()
    elif args.resume and (out / "tokenizer.model").is_file():
        tok_bytes = (out / "tokenizer.model").read_bytes()
    else:
        tok_bytes = td.train_tokenizer(train_works, args.vocab_size)
    sp = td.load_tokenizer(tok_bytes)
    bos = sp.bos_id() if args.window_bos == "every" else None
    train_stream = td.TokenStream(td.encode_works(sp, train_works), args.seq_len, bos)
    val_stream = td.TokenStream(td.encode_works(sp, val_works), args.seq_len, bos)
    info = {"train_works": len(train_works), "val_works": [f"{w.name} ({w.title})" for w in val_works],
            "train_tokens": int(train_stream.tokens.numel()), "val_tokens": int(val_stream.tokens.numel()),
            "vocab_size": sp.get_piece_size()}
    return tok_bytes, sp.get_piece_size(), train_stream, val_stream.windows(args.val_windows), info


def prepare_start_data(args: argparse.Namespace, start):
    """--init-from: the start's tokenizer over the corpus's works (split as prepare_data splits them) or over
    --text (its last --val-fraction held out). -> (vocab, train stream, validation windows, description)."""
    from . import data as td

    tok, bos = start.tokenizer, start.tokenizer.bos_id
    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
        ids = torch.tensor(tok.encode(text, add_bos=False), dtype=torch.int32)
        cut = int(ids.numel() * (1 - args.val_fraction))
        train_ids, val_ids = ids[:cut], ids[cut:]
        info = {"text": Path(args.text).name, "val_fraction": args.val_fraction}
    else:
        works = td.load_works(args.data)
        train_works, val_works = td.split_works(works, [n.strip() for n in args.val_works.split(",") if n.strip()])

        def encode(ws):
            return torch.tensor([t for w in ws for t in ([bos] if bos is not None else []) +
                                 tok.encode(w.text, add_bos=False)], dtype=torch.int32)

        train_ids, val_ids = encode(train_works), encode(val_works)
        info = {"train_works": len(train_works), "val_works": [f"{w.name} ({w.title})" for w in val_works]}
    window_bos = bos if args.window_bos == "every" else None
    train_stream = td.TokenStream(train_ids, args.seq_len, window_bos)
    val_stream = td.TokenStream(val_ids, args.seq_len, window_bos)
    info.update({"train_tokens": int(train_ids.numel()), "val_tokens": int(val_ids.numel()),
                 "vocab_size": start.config.vocab_size, "init_from": str(start.folder), "arch": start.arch})
    return start.config.vocab_size, train_stream, val_stream.windows(args.val_windows), info


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) one training job; returns the summary also written to training.json. Callers other than
    run() must set args.lr (its CLI default None means "pick by mode")."""
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "trainer_state.pt"
    resume = None
    if not args.resume and state_path.exists():
        raise FileExistsError(f"{out} already holds a training run ({state_path.name}); pass --resume to continue "
                              f"it, or choose another --out")
    if args.resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: {state_path} not found")
        resume = torch.load(state_path, map_location="cpu", weights_only=False)
        saved = resume["args"]
        for key in ("hidden", "intermediate", "layers", "heads", "kv_heads", "seq_len", "sparsity",
                    "precision", "untied", "vocab_size", "val_works", "batch_size", "window_bos", "init_from",
                    "text", "topk_rescale"):
            if saved.get(key) != getattr(args, key):
                raise ValueError(f"--resume: --{key.replace('_', '-')} is {getattr(args, key)!r} but the "
                                 f"checkpoint was trained with {saved.get(key)!r}")

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    sparsity = SparsityConfig.parse(args.sparsity)
    start = None
    if args.init_from:
        from . import hf_init

        start = hf_init.read_start(args.init_from, args.topk_rescale)
        cfg = start.config
        check_topk(cfg, sparsity)
        if args.seq_len > cfg.max_seq_len:
            raise ValueError(f"--seq-len {args.seq_len} exceeds the start model's context of {cfg.max_seq_len}")
        tok_bytes = None
        vocab, stream, (val_x, val_y), data_info = prepare_start_data(args, start)
        model = build_model(cfg, sparsity)
        hf_init.load_weights(model, start)
        model = model.to(device)
    else:
        if args.text:
            raise ValueError("--text needs --init-from (a from-scratch run trains its tokenizer on --data's works)")
        if args.topk_rescale != "none":
            raise ValueError("--topk-rescale l2 is for full-precision models (--init-from)")
        tok_bytes, vocab, stream, (val_x, val_y), data_info = prepare_data(args, out)
        cfg = model_config_from_args(args, vocab)
        check_topk(cfg, sparsity)
        model = build_model(cfg, sparsity, args.precision).to(device)
    opt = make_optimizer(model, args.lr, args.weight_decay)
    sched = Schedule(args.lr, args.warmup, args.steps, args.min_lr_ratio)
    gen = torch.Generator().manual_seed(args.seed)
    step, tokens_seen, best_val, curves = 0, 0, float("inf"), {"train": [], "val": []}
    wall_before = 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        step, tokens_seen, best_val = resume["step"], resume["tokens_seen"], resume["best_val"]
        curves, wall_before = resume["curves"], resume["wall_s"]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    n_params = count_params(model)
    tokens_per_step = args.batch_size * args.seq_len
    summary = {"params": n_params, "params_non_embedding": n_params - model.embed.numel(),
               "model": cfg.to_dict(), "sparsity": sparsity.to_dict(),
               "precision": args.precision if start is None else "fp",
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "tokens_per_step": tokens_per_step, "data": data_info, "args": _training_args(args)}
    print(f"model: {n_params / 1e6:.2f}M params ({summary['params_non_embedding'] / 1e6:.2f}M non-embedding), "
          f"sparsity {sparsity.describe()}, precision {summary['precision']}, device {summary['device']}"
          + (f", from {start.arch} {start.folder}" if start is not None else ""), flush=True)
    if "train_works" in data_info:
        print(f"data: {data_info['train_works']} training works ({data_info['train_tokens']:,} tokens); "
              f"validation: {', '.join(data_info['val_works'])} ({data_info['val_tokens']:,} tokens)", flush=True)
    else:
        print(f"data: {data_info['text']}: {data_info['train_tokens']:,} training tokens, the last "
              f"{data_info['val_tokens']:,} for validation", flush=True)

    def save_folder(folder: Path, extra: dict) -> None:
        dtype = choose_save_dtype(model, args.save_dtype)
        if start is not None:
            hf_init.save_folder(folder, model, start, sparsity, dtype, extra=extra)
        else:
            save_model_folder(folder, model, tok_bytes, dtype, extra=extra)

    def save() -> None:
        save_folder(out, summary)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                    "step": step, "tokens_seen": tokens_seen, "best_val": best_val, "curves": curves,
                    "wall_s": wall_before + time.time() - t0, "args": _training_args(args)}, state_path)
        (out / "curves.json").write_text(json.dumps({"summary": summary, **curves}) + "\n")

    def validate() -> float:
        nonlocal best_val
        v = evaluate(model, val_x, val_y, args.batch_size, device)
        curves["val"].append([step, tokens_seen, v])
        if v < best_val:
            best_val = v
            if args.keep_best:
                save_folder(out / "best", {**summary, "step": step, "val_loss": v})
        return v

    t0 = time.time()
    deadline = t0 + args.max_minutes * 60 if args.max_minutes else None
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0)
    model.train()
    loss_acc, acc_n, t_log, tok_log = torch.zeros((), device=device), 0, time.time(), tokens_seen
    val_loss = float("nan")
    stopped_early = False
    if start is not None and step == 0:  # the start's loss at this sparsity (training-free): the curve's origin
        val_loss = validate()
        print(f"step 0 (the start, training-free) val_loss {val_loss:.4f}", flush=True)
    while step < args.steps:
        lr = sched(step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = stream.sample(args.batch_size, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device):
            loss = lm_loss(model, x, y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        loss_acc += loss.detach()
        acc_n += 1
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = (loss_acc / acc_n).item()  # the only host sync of the step loop
            now = time.time()
            tok_s = (tokens_seen - tok_log) / max(now - t_log, 1e-9)
            curves["train"].append([step, tokens_seen, mean_loss, lr, tok_s])
            bar.set_postfix(loss=f"{mean_loss:.3f}", val=f"{val_loss:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}")
            if not sys.stderr.isatty():
                print(f"step {step}/{args.steps} loss {mean_loss:.4f} lr {lr:.2e} tok/s {tok_s:,.0f}", flush=True)
            if not math.isfinite(mean_loss):
                raise RuntimeError(f"training diverged at step {step} (loss {mean_loss})")
            loss_acc.zero_()
            acc_n, t_log, tok_log = 0, now, tokens_seen
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = validate()
            print(f"step {step} tokens {tokens_seen:,} val_loss {val_loss:.4f} (best {best_val:.4f})", flush=True)
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            save()
        out_of_time = deadline is not None and time.time() > deadline
        if (out_of_time or step == args.stop_at_step) and step < args.steps:
            why = "--max-minutes reached" if out_of_time else "--stop-at-step"
            print(f"{why} at step {step}; saving and stopping (continue with --resume)", flush=True)
            stopped_early = True
            if not curves["val"] or curves["val"][-1][0] != step:
                val_loss = validate()
            break
    bar.close()
    wall = wall_before + time.time() - t0
    summary.update({"steps": step, "tokens_seen": tokens_seen, "final_val_loss": curves["val"][-1][2] if curves["val"] else None,
                    "best_val_loss": best_val, "final_train_loss": curves["train"][-1][2] if curves["train"] else None,
                    "wall_s": wall, "stopped_early": stopped_early})
    save()
    print(json.dumps({k: summary[k] for k in ("params", "steps", "tokens_seen", "final_val_loss", "best_val_loss",
                                              "final_train_loss", "wall_s")}), flush=True)
    return summary


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Defaults reproduce the built-in Shakespeare model (see docs/TRAINING.md)."""
    from .data import DEFAULT_VAL_WORKS, DEFAULT_VOCAB

    d = p.add_argument_group("data")
    d.add_argument("--data", default=DEFAULT_CORPUS,
                   help="corpus: a folder of *_gut.txt works, or a .tar.xz of one (default: %(default)s)")
    d.add_argument("--val-works", default=",".join(DEFAULT_VAL_WORKS),
                   help="comma-separated works held out for validation (default: %(default)s)")
    d.add_argument("--tokenizer", default=None, help="existing tokenizer.model (default: train one on the training works)")
    d.add_argument("--text", default=None,
                   help="with --init-from: train on this UTF-8 text file instead of --data (its last --val-fraction "
                        "held out)")
    d.add_argument("--val-fraction", type=float, default=0.05, help="share of --text held out for validation")
    d.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    d.add_argument("--val-windows", type=int, default=None, help="cap on validation windows (default: all)")
    d.add_argument("--window-bos", choices=("every", "doc"), default="every",
                   help="BOS at the start of every training/validation window (default), or only where a "
                        "work begins (doc; the mini-replication's runs used this)")
    m = p.add_argument_group("model")
    m.add_argument("--hidden", type=int, default=384)
    m.add_argument("--intermediate", type=int, default=1024)
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--heads", type=int, default=6)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--seq-len", type=int, default=512, help="training window = the model's context")
    m.add_argument("--untied", action="store_true", help="separate LM head (default: tied to the embedding)")
    m.add_argument("--sparsity", default="0.6", help="one ratio or attn,o,mlp,down (default: %(default)s)")
    m.add_argument("--precision", choices=sorted(PRECISIONS), default="ternary",
                   help="ternary (BitNet b1.58 + int8) or fp (full-precision baseline)")
    m.add_argument("--init-from", default=None,
                   help="continue-train a full-precision Hugging Face model (LlamaForCausalLM, MistralForCausalLM, "
                        "Qwen2ForCausalLM folder) at --sparsity with the STE top-K; the model options above are "
                        "then the start's, and OUT is a folder of the same architecture")
    m.add_argument("--topk-rescale", choices=("none", "l2"), default="none",
                   help="with --init-from: the paper's L2 re-scale after each top-K (recorded for qsparse convert)")
    o = p.add_argument_group("optimization")
    o.add_argument("--steps", type=int, default=2000)
    o.add_argument("--batch-size", type=int, default=32)
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-3; 3e-4 with --init-from)")
    o.add_argument("--min-lr-ratio", type=float, default=0.1)
    o.add_argument("--warmup", type=int, default=100)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0)
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/shakespeare", help="checkpoint folder (default: %(default)s)")
    r.add_argument("--resume", action="store_true", help="continue from OUT/trainer_state.pt")
    r.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    r.add_argument("--log-every", type=int, default=20)
    r.add_argument("--eval-every", type=int, default=200)
    r.add_argument("--save-every", type=int, default=1000)
    r.add_argument("--keep-best", action="store_true", help="also save the lowest-validation-loss model to OUT/best")
    r.add_argument("--save-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="model.safetensors dtype; auto = fp32 if the file stays under 16 MB, else bf16")
    r.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much wall time")
    r.add_argument("--stop-at-step", type=int, default=None,
                   help="stop (and save) at this step, keeping the schedule of --steps; continue with --resume")


def run(args: argparse.Namespace) -> int:
    if args.lr is None:
        args.lr = 3e-4 if args.init_from else 3e-3
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must lie in (0, 1), got {args.val_fraction}")
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "vocab_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    train(args)
    return 0
