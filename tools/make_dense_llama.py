"""Make the small dense Llama that `qsparse train --init-from` starts from (docs/TRAINING.md, "Full precision").

No trained full-precision checkpoint is at hand offline, so this trains one: a transformers LlamaForCausalLM
(GQA, tied embeddings, SiLU-GLU, RoPE), dense (no top-K), on the training works of the shipped Shakespeare
corpus, with the built-in model's tokenizer (the same split, so held-out numbers compare), and saves it with
transformers' own save_pretrained plus tokenizer.model. CPU-sized: a few minutes.

Usage: python tools/make_dense_llama.py --out runs/llama-tiny [--steps 500] [--max-minutes 10]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/llama-tiny")
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-windows", type=int, default=48)
    p.add_argument("--max-minutes", type=float, default=None)
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from qsparse_infer.engine import BUILTIN_MODEL
    from qsparse_infer.model.format import read_engine
    from qsparse_infer.train import data as td

    torch.manual_seed(args.seed)
    tok_bytes = read_engine(BUILTIN_MODEL).tokenizer_bytes  # trained on the same training works
    sp = td.load_tokenizer(tok_bytes)
    train_works, val_works = td.split_works(td.load_works(td.BUILTIN_CORPUS), td.DEFAULT_VAL_WORKS)
    bos = sp.bos_id()
    stream = td.TokenStream(td.encode_works(sp, train_works), args.seq_len, bos)
    val_x, val_y = td.TokenStream(td.encode_works(sp, val_works), args.seq_len, bos).windows(args.val_windows)
    cfg = LlamaConfig(vocab_size=sp.get_piece_size(), hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=sp.eos_id(),
                      pad_token_id=None)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def validate() -> float:
        model.eval()
        total = sum(loss_of(val_x[i:i + 8], val_y[i:i + 8]).item() * val_y[i:i + 8].numel()
                    for i in range(0, val_x.shape[0], 8))
        model.train()
        return total / val_y.numel()

    print(f"LlamaForCausalLM {n_params / 1e6:.2f}M params; {stream.tokens.numel():,} training tokens", flush=True)
    curves: dict[str, list] = {"train": [], "val": []}
    t0 = time.time()
    step = 0
    model.train()
    while step < args.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = stream.sample(args.batch_size, gen)
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        curves["train"].append([step, step * args.batch_size * args.seq_len, loss.item()])
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        out_of_time = args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes
        if step % args.eval_every == 0 or step == args.steps or out_of_time:
            v = validate()
            curves["val"].append([step, step * args.batch_size * args.seq_len, v])
            print(f"step {step} val_loss {v:.4f}", flush=True)
        if out_of_time:
            print(f"--max-minutes reached at step {step}", flush=True)
            break
    out = Path(args.out)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(out))
    (out / "tokenizer.model").write_bytes(tok_bytes)
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": sp.id_to_piece(bos),
                                                           "eos_token": sp.id_to_piece(sp.eos_id())}) + "\n")
    summary = {"params": n_params, "steps": step, "tokens": step * args.batch_size * args.seq_len,
               "wall_s": time.time() - t0, "final_val_loss": curves["val"][-1][2], "args": vars(args),
               "val_windows": int(val_x.shape[0])}
    (out / "curves.json").write_text(json.dumps({"summary": summary, **curves}) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
