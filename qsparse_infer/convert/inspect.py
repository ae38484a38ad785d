"""`qsparse inspect FILE`: what an engine file holds, and how many bytes decoding one token reads."""
from __future__ import annotations

import argparse
import re
from collections import OrderedDict

from ..model.config import SparsityConfig, topk_count
from ..model.format import GROUPS, EngineFile, group_geometry, read_engine
from ..packing import packed_columns

# Which sparsity group's ratio selects the rows of each packed group.
GROUP_SPARSITY = {"qkv": "attn", "o": "o", "gate_up": "mlp", "down": "down"}


def tensor_group(name: str) -> str:
    """The row of the size table a tensor is counted in."""
    m = re.match(r"layers\.\d+\.(\w+)\.(packed|scales|weight_t|bias)$", name)
    if m:
        return m.group(1)
    if name.startswith("layers."):
        return "norms"
    return {"norm": "norms"}.get(name, name)


def size_table(ef: EngineFile) -> "OrderedDict[str, tuple[int, int]]":
    """group -> (number of tensors, bytes)."""
    table: OrderedDict[str, tuple[int, int]] = OrderedDict()
    for name, t in sorted(ef.tensors.items()):
        g = tensor_group(name)
        n, b = table.get(g, (0, 0))
        table[g] = (n + 1, b + t.numel() * t.element_size())
    if ef.tokenizer_bytes is not None:
        table["tokenizer.bytes"] = (1, len(ef.tokenizer_bytes))
    return table


def bytes_per_token(ef: EngineFile, sparsity: SparsityConfig) -> "OrderedDict[str, int]":
    """Weight bytes one decode step reads: the selected packed rows of every projection group (K rows of
    Npad/4 bytes, plus its scales), the norms, one embedding row, and the LM head (K of H columns when its
    sparsity > 0). KV-cache reads are not included: they depend on the position."""
    cfg = ef.config
    out: OrderedDict[str, int] = OrderedDict()
    for group in GROUPS:
        d, segs, layout = group_geometry(cfg, group)
        k = topk_count(d, getattr(sparsity, GROUP_SPARSITY[group]))
        if cfg.precision == "ternary":
            out[group] = cfg.num_layers * (k * packed_columns(segs, layout) // 4 + 4 * len(segs))
            continue
        w = ef.tensors[f"layers.0.{group}.weight_t"]
        if group == "gate_up":  # gate and up may keep different channels: each reads its half of the row
            k_up = topk_count(d, sparsity.up_ratio)
            out[group] = cfg.num_layers * (k + k_up) * segs[0] * w.element_size()
        else:
            out[group] = cfg.num_layers * k * w.shape[1] * w.element_size()
        if group == "qkv" and cfg.attn_bias:
            out[group] += cfg.num_layers * w.shape[1] * ef.tensors["layers.0.qkv.bias"].element_size()
    out["norms"] = sum(t.numel() * t.element_size() for n, t in ef.tensors.items() if tensor_group(n) == "norms")
    embed = ef.tensors["embed_tokens"]
    out["embedding row"] = embed.shape[1] * embed.element_size()
    head = ef.tensors["embed_tokens" if cfg.tie_word_embeddings else "lm_head"]
    k_head = topk_count(cfg.hidden_size, sparsity.lm_head)
    if "lm_head.q8" in ef.tensors:  # the int8 head (head_int8.py) replaces the float one in the step
        out["lm_head (int8)"] = head.shape[0] * (k_head + 4)
    else:
        out["lm_head"] = head.shape[0] * k_head * head.element_size()
    return out


def _fmt(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def report(ef: EngineFile, path: str = "") -> str:
    cfg, sp = ef.config, ef.sparsity
    lines = [f"engine file {path}".rstrip(), f"  format version : {ef.format_version}",
             f"  source         : {ef.source or '-'}", "  config         :"]
    lines += [f"    {k:<20} {v}" for k, v in cfg.to_dict().items()]
    lines.append(f"  sparsity       : {sp.describe()}")
    info = ef.tokenizer_info
    lines.append(f"  tokenizer      : {info.get('kind')} (bos {info.get('bos_id')}, eos {info.get('eos_ids')}, "
                 f"chat template: {'yes' if info.get('chat_template') else 'no'})")
    lines.append("")
    lines.append(f"  {'group':<16} {'tensors':>8} {'bytes':>14}")
    total = 0
    for g, (n, b) in size_table(ef).items():
        lines.append(f"  {g:<16} {n:>8} {b:>14,}  {_fmt(b)}")
        total += b
    lines.append(f"  {'total':<16} {'':>8} {total:>14,}  {_fmt(total)}")
    lines.append("")
    at_cfg, dense = bytes_per_token(ef, sp), bytes_per_token(ef, SparsityConfig())
    lines.append(f"  bytes read per token  {'configured':>14} {'S=0 (dense)':>14}")
    for g in at_cfg:
        lines.append(f"  {g:<20} {at_cfg[g]:>14,} {dense[g]:>14,}")
    a, d = sum(at_cfg.values()), sum(dense.values())
    lines.append(f"  {'total':<20} {a:>14,} {d:>14,}   ({_fmt(a)} vs {_fmt(d)}, {a / d:.1%} of dense)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="engine file (.qsp)")


def run(args: argparse.Namespace) -> int:
    print(report(read_engine(args.file), args.file))
    return 0
