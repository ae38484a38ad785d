"""`qsparse train --init-from HF_FOLDER`: a full-precision Hugging Face model (Llama, Mistral, Qwen2) into the
training model and back.

In: the folder's config.json (model/hf_dense.py) and weights (model/hf_checkpoint.py) become the reference
`Transformer` with full-precision QSparseLinear projections (STE top-K, optional L2 re-scale), widened to fp32 for
training; its tokenizer (tokenizer.model or tokenizer.json) encodes the data.
Out: a folder of the same architecture that transformers loads as it loaded the input (same config.json, plus
`q_sparse`: {"sparsity", "topk_rescale"}, the record `qsparse convert` reads as this model's defaults), the
weights under their transformers names in model.safetensors, and the input's tokenizer files copied.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..model.config import ModelConfig, SparsityConfig
from ..model.hf_checkpoint import Checkpoint, read_json
from ..model.hf_dense import DENSE_ARCHITECTURES, read_dense_config
from ..model.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")


@dataclass
class HfStart:
    """What --init-from read: the architecture, its config.json, the tensor names and the tokenizer."""

    folder: Path
    arch: str
    hf_config: dict[str, Any]
    config: ModelConfig
    names: dict[str, str]
    tokenizer: Tokenizer


def read_start(folder: str | Path, topk_rescale: str = "none") -> HfStart:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--init-from: {folder} has no config.json")
    hf = read_json(folder / "config.json")
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in DENSE_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"--init-from: architecture {archs or '(none given)'} is not a full-precision family "
                         f"({', '.join(DENSE_ARCHITECTURES)}); train ternary models from scratch")
    ckpt = Checkpoint(folder)
    layout = read_dense_config(hf, arch, ckpt.__contains__)
    cfg = ModelConfig.from_dict({**layout.config.to_dict(), "topk_rescale": topk_rescale})
    if (folder / "tokenizer.model").is_file():
        tok = Tokenizer("sentencepiece", (folder / "tokenizer.model").read_bytes())
    elif (folder / "tokenizer.json").is_file():
        bos = read_json(folder / "tokenizer_config.json").get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        tok = Tokenizer("hf_json", (folder / "tokenizer.json").read_bytes())
        tok.bos_id = tok.token_to_id(bos) if isinstance(bos, str) else None
    else:
        raise FileNotFoundError(f"--init-from: {folder} has no tokenizer.model or tokenizer.json")
    return HfStart(folder, arch, hf, cfg, layout.names, tok)


def _training_names() -> dict[str, str]:
    """Role (model/hf_dense.py's names; layer roles with {i}) -> the training model's parameter name."""
    roles = {"embed": "embed", "norm": "norm.weight", "lm_head": "lm_head",
             "input_norm": "layers.{i}.input_norm.weight", "post_attn_norm": "layers.{i}.post_attn_norm.weight"}
    for p in ("q", "k", "v", "o"):
        roles[p] = f"layers.{{i}}.attn.{p}.weight"
    for p in ("gate", "up", "down"):
        roles[p] = f"layers.{{i}}.mlp.{p}.weight"
    for p in ("q", "k", "v"):
        roles[p + "_bias"] = f"layers.{{i}}.attn.{p}_bias"
    return roles


def name_pairs(start: HfStart) -> list[tuple[str, str]]:
    """(transformers tensor name, training-model parameter name) for every weight of the model."""
    cfg, pairs = start.config, []
    roles = _training_names()
    for role, hf_name in start.names.items():
        if role == "lm_head" and cfg.tie_word_embeddings:
            continue
        if "{i}" in hf_name:
            pairs += [(hf_name.format(i=i), roles[role].format(i=i)) for i in range(cfg.num_layers)]
        else:
            pairs.append((hf_name, roles[role]))
    return pairs


def load_weights(model, start: HfStart) -> None:
    """Copy the checkpoint's weights into the training model (fp32), checking every shape and value."""
    ckpt = Checkpoint(start.folder)
    params = dict(model.named_parameters())
    seen = set()
    with torch.no_grad():
        for hf_name, name in name_pairs(start):
            t = ckpt.get(hf_name)
            p = params[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"--init-from: tensor {hf_name!r} has shape {tuple(t.shape)}, the config implies "
                                 f"{tuple(p.shape)}")
            if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
                raise ValueError(f"--init-from: tensor {hf_name!r} is not a finite float tensor")
            p.copy_(t.float())
            seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"--init-from: no checkpoint tensor for {missing[:5]}")


def save_folder(out: Path, model, start: HfStart, sparsity: SparsityConfig, dtype: torch.dtype,
                extra: dict | None = None) -> None:
    """Write the trained model as a folder of the start's architecture (atomically, as save_model_folder)."""
    from safetensors.torch import save_file

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = dict(model.named_parameters())
    state = {hf: params[name].detach().to("cpu", dtype).contiguous() for hf, name in name_pairs(start)}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    hf = {k: v for k, v in start.hf_config.items() if k not in ("torch_dtype", "dtype")}
    hf["dtype"] = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}[dtype]
    hf["q_sparse"] = {"sparsity": sparsity.to_dict(), "topk_rescale": model.cfg.topk_rescale}
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (start.folder / name).is_file():
            shutil.copyfile(start.folder / name, tmp / name)
    if extra is not None:
        (tmp / "training.json").write_text(json.dumps(extra, indent=2) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for old in ("model.safetensors", "model.safetensors.index.json"):  # the start's shards never come along
        (out / old).unlink(missing_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
