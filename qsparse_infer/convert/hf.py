"""`qsparse convert SRC DST`: a Hugging Face checkpoint folder -> one engine file (format v1 for ternary
models; v2 for LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM, which convert/dense.py streams).

The folder holds config.json, one or several *.safetensors (with model.safetensors.index.json when sharded),
and tokenizer files (tokenizer.model or tokenizer.json; tokenizer_config.json for special tokens and the
chat template, or chat_template.jinja; generation_config.json for extra end-of-sequence ids).
We dispatch on config.json `architectures`, never on `model_type`:

* ``BitNetForCausalLM`` (transformers, e.g. microsoft/bitnet-b1.58-2B-4T). Projections are either
  - offline packed: uint8 [N/4, D], 4 ternary values per byte along the output dim (quant.unpack_hf_bitnet),
    with a `weight_scale`: quantization_config.linear_class "autobitlinear" multiplies (beta = weight_scale),
    "bitlinear" (the default) divides (beta = 1 / weight_scale);
  - offline unpacked "autobitlinear": float tensors already holding {-1, 0, 1}, beta = weight_scale;
  - latent (online mode): float weights ternarized with absmean. Without any quantization_config the
    checkpoint is a full-precision model to transformers: refused unless --ternarize.
  Sub-norms `self_attn.attn_sub_norm` / `mlp.ffn_sub_norm`; `hidden_act` relu2 or silu; `rope_theta` at top
  level or inside `rope_parameters`; the LM head falls back to `embed_tokens` when tied or missing.
  quantization_config.use_rms_norm = true (an extra RMSNorm inside every BitLinear) is rejected.
* ``BitnetForCausalLM`` (community 1bitLLM/bitnet_b1_58-large, -3B; config model_type "llama"): the same
  tensors with sub-norms named `self_attn.inner_attn_ln` and `mlp.ffn_layernorm`, SiLU-GLU, fp16 latent weights.
* ``QSparseForCausalLM`` (this project's training tool). config.json:
  ``{"architectures": ["QSparseForCausalLM"], "qsparse": {"model": <ModelConfig dict>, "sparsity":
  <SparsityConfig dict>}}``; model.safetensors holds the state_dict of `reference.Transformer` built with latent
  projections (`.weight` [out, in], fp32): `embed`, `norm.weight`, `lm_head` (absent when tied), and per layer
  `layers.{i}.input_norm.weight`, `layers.{i}.post_attn_norm.weight`, `layers.{i}.attn.{q,k,v,o}.weight`,
  `layers.{i}.attn.sub_norm.weight`, `layers.{i}.mlp.{gate,up,down}.weight`, `layers.{i}.mlp.sub_norm.weight`
  (sub-norms present iff the config says so); plus tokenizer.model. Weights are ternarized with absmean.
  A full-precision baseline (training.json or qsparse "precision" other than "ternary") is rejected.

The sparsity stored in the file is --sparsity, else the ratio the checkpoint records (`qsparse.sparsity`,
or a top-level `sparsity` / `q_sparse` entry), else 0. The output is written atomically (format.write_engine).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..model.config import TOPK_RESCALES, ModelConfig, SparsityConfig, check_topk
from ..model.format import GROUPS, group_geometry, write_engine
from ..model.hf_checkpoint import Checkpoint, CheckpointError
from ..model.hf_checkpoint import read_json as _read_json
from ..model.hf_dense import DENSE_ARCHITECTURES
from ..model.quant import ternarize_absmean, unpack_hf_bitnet
from ..packing import pack_ternary

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PROJ_SHAPES = ("q", "k", "v", "o", "gate", "up", "down")


# The converter's errors are the checkpoint reader's: one type for "this folder cannot be converted".
ConversionError = CheckpointError


# ---------------------------------------------------------------------------------------------
# Architecture readers: config.json -> Layout (the config plus where each tensor lives)
# ---------------------------------------------------------------------------------------------


@dataclass
class Layout:
    config: ModelConfig
    names: dict[str, str]  # role -> tensor name; layer roles contain "{i}"
    scale_mode: str = "multiply"  # how `weight_scale` of packed weights relates to beta: multiply | divide
    float_is_ternary: bool = False  # offline autobitlinear: float weights already hold {-1,0,1}
    recorded_sparsity: SparsityConfig | None = None
    notes: list[str] = field(default_factory=list)


def _hf_names(attn_sub: str, ffn_sub: str) -> dict[str, str]:
    layer = "model.layers.{i}."
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight",
             "input_norm": layer + "input_layernorm.weight", "post_attn_norm": layer + "post_attention_layernorm.weight",
             "attn_sub_norm": layer + f"self_attn.{attn_sub}.weight", "ffn_sub_norm": layer + f"mlp.{ffn_sub}.weight"}
    for p in ("q", "k", "v", "o"):
        names[p] = layer + f"self_attn.{p}_proj.weight"
    for p in ("gate", "up", "down"):
        names[p] = layer + f"mlp.{p}_proj.weight"
    return names


def _recorded_sparsity(value: Any) -> SparsityConfig | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError("a boolean is not a ratio")
        if isinstance(value, (int, float)):
            return SparsityConfig.uniform(float(value))
        if isinstance(value, str):
            return SparsityConfig.parse(value)
        if isinstance(value, dict):
            return SparsityConfig.from_dict(value)
        if isinstance(value, list):
            return SparsityConfig.parse(",".join(str(v) for v in value))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"the checkpoint's recorded sparsity {value!r} is invalid: {e}") from None
    raise ConversionError(f"the checkpoint's recorded sparsity {value!r} is not a ratio, list or dict")


def _rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConversionError(f"RoPE type {rope_type!r} is not supported (only the default rotary embedding)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    return float(theta)


def _llama_like_config(hf: dict[str, Any], ckpt: Checkpoint, names: dict[str, str], default_act: str) -> ModelConfig:
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if heads <= 0:
            raise ConversionError(f"config.json: num_attention_heads must be > 0, got {heads}")
        act = hf.get("hidden_act", default_act)
        if act not in ("relu2", "silu"):
            raise ConversionError(f"hidden_act {act!r} is not supported (relu2 or silu)")
        tied = bool(hf.get("tie_word_embeddings", False)) or names["lm_head"] not in ckpt
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)), rope_theta=_rope_theta(hf),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)), activation=act,
            attn_sub_norm=names["attn_sub_norm"].format(i=0) in ckpt,
            ffn_sub_norm=names["ffn_sub_norm"].format(i=0) in ckpt, tie_word_embeddings=tied)
    except KeyError as e:
        raise ConversionError(f"config.json lacks required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # e.g. "hidden_size": null, "rms_norm_eps": "abc"
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"config.json describes an invalid model: {e}") from None


def _hf_sparsity(hf: dict[str, Any]) -> SparsityConfig | None:
    for key in ("sparsity", "q_sparse"):
        if key in hf:
            value = hf[key]
            if isinstance(value, dict) and "sparsity" in value:  # {"q_sparse": {"sparsity": 0.6, ...}}
                value = value["sparsity"]
            return _recorded_sparsity(value)
    return None


def read_bitnet(hf: dict[str, Any], ckpt: Checkpoint, ternarize: bool = False) -> Layout:
    qc = hf.get("quantization_config") or {}
    if not isinstance(qc, dict):
        raise ConversionError(f"config.json: quantization_config must be an object, got {qc!r}")
    if not qc:
        if not ternarize:
            raise ConversionError(
                "config.json has no quantization_config, so transformers runs this BitNetForCausalLM at full "
                "precision; converting would ternarize its weights and change its outputs. Pass ternarize=True "
                "(--ternarize) to convert it anyway")
        warnings.warn("ternarizing a full-precision BitNetForCausalLM (no quantization_config): the engine's "
                      "outputs will differ from transformers'")
    if qc and qc.get("quant_method", "bitnet") != "bitnet":
        raise ConversionError(f"quantization_config.quant_method {qc.get('quant_method')!r} is not supported")
    if qc.get("use_rms_norm"):
        raise ConversionError("quantization_config.use_rms_norm = true (an RMSNorm inside every BitLinear) "
                              "is not supported")
    linear_class = qc.get("linear_class", "bitlinear")
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise ConversionError(f"quantization_config.linear_class {linear_class!r} is not supported")
    mode = qc.get("quantization_mode", "offline")
    names = _hf_names("attn_sub_norm", "ffn_sub_norm")
    cfg = _llama_like_config(hf, ckpt, names, "relu2")
    if not (cfg.attn_sub_norm and cfg.ffn_sub_norm):
        missing = names["attn_sub_norm" if not cfg.attn_sub_norm else "ffn_sub_norm"].format(i=0)
        raise ConversionError(f"checkpoint is missing tensor {missing!r} (BitNet sub-norm)")
    return Layout(cfg, names, scale_mode="multiply" if linear_class == "autobitlinear" else "divide",
                  float_is_ternary=bool(qc) and linear_class == "autobitlinear" and mode == "offline",
                  recorded_sparsity=_hf_sparsity(hf))


def read_community_bitnet(hf: dict[str, Any], ckpt: Checkpoint) -> Layout:
    names = _hf_names("inner_attn_ln", "ffn_layernorm")
    cfg = _llama_like_config(hf, ckpt, names, "silu")
    return Layout(cfg, names, recorded_sparsity=_hf_sparsity(hf))


def read_qsparse(hf: dict[str, Any], ckpt: Checkpoint) -> Layout:
    q = hf.get("qsparse")
    if not isinstance(q, dict) or "model" not in q:
        raise ConversionError("config.json of a QSparseForCausalLM checkpoint needs a 'qsparse': {'model': ...} entry")
    # The training tool's full-precision baseline (training.json "precision": "fp") is not a ternary model.
    precision = q.get("precision", _read_json(ckpt.folder / "training.json").get("precision", "ternary"))
    if precision != "ternary":
        raise ConversionError(f"this checkpoint was trained with precision {precision!r} (a full-precision "
                              f"baseline); only ternary (BitNet b1.58) checkpoints can be converted")
    try:
        cfg = ModelConfig.from_dict(q["model"])
    except (TypeError, ValueError) as e:
        raise ConversionError(f"invalid qsparse.model config: {e}") from None
    names = {"embed": "embed", "norm": "norm.weight", "lm_head": "lm_head",
             "input_norm": "layers.{i}.input_norm.weight", "post_attn_norm": "layers.{i}.post_attn_norm.weight",
             "attn_sub_norm": "layers.{i}.attn.sub_norm.weight", "ffn_sub_norm": "layers.{i}.mlp.sub_norm.weight"}
    for p in ("q", "k", "v", "o"):
        names[p] = f"layers.{{i}}.attn.{p}.weight"
    for p in ("gate", "up", "down"):
        names[p] = f"layers.{{i}}.mlp.{p}.weight"
    return Layout(cfg, names, recorded_sparsity=_recorded_sparsity(q.get("sparsity")))


ARCHITECTURES: dict[str, Callable[[dict[str, Any], Checkpoint], Layout]] = {
    "BitNetForCausalLM": read_bitnet,
    "BitnetForCausalLM": read_community_bitnet,
    "QSparseForCausalLM": read_qsparse,
}


# ---------------------------------------------------------------------------------------------
# Tensor checks and conversion
# ---------------------------------------------------------------------------------------------


def _check_float(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ConversionError(f"tensor {name!r} has shape {tuple(t.shape)}, but the config implies {shape}")
    if t.dtype not in FLOAT_DTYPES:
        raise ConversionError(f"tensor {name!r} has dtype {t.dtype}; expected a float tensor")
    if not bool(torch.isfinite(t).all()):
        raise ConversionError(f"tensor {name!r} contains NaN or infinite values")
    if not bool(t.any()):
        raise ConversionError(f"tensor {name!r} is all zeros (a broken upload?)")
    return t


def _load_projection(ckpt: Checkpoint, layout: Layout, name: str, out_f: int, in_f: int
                     ) -> tuple[torch.Tensor, float]:
    """-> (ternary int8 [out_f, in_f], beta) with W ~= beta * T."""
    w = ckpt.get(name)
    scale_name = name[: -len("weight")] + "weight_scale"
    if w.dtype == torch.uint8:  # offline packed (transformers' BitNet layout)
        rows = math.ceil(out_f / 4)
        if tuple(w.shape) != (rows, in_f):
            raise ConversionError(f"packed tensor {name!r} has shape {tuple(w.shape)}, but the config implies "
                                  f"({rows}, {in_f}) for a [{out_f}, {in_f}] projection")
        t = unpack_hf_bitnet(w, out_f)
        if bool((t > 1).any()):
            raise ConversionError(f"packed tensor {name!r} holds values outside {{-1, 0, 1}} (2-bit code 3)")
        beta = _weight_scale(ckpt, scale_name, layout.scale_mode)
    elif layout.float_is_ternary and scale_name in ckpt:  # offline autobitlinear, unpacked
        _check_float(name, w, (out_f, in_f))
        t = w.float()
        if not bool(((t == -1) | (t == 0) | (t == 1)).all()):
            raise ConversionError(f"tensor {name!r} should hold ternary values {{-1, 0, 1}} (offline autobitlinear)")
        t = t.to(torch.int8)
        beta = _weight_scale(ckpt, scale_name, "multiply")
    else:  # latent weights
        _check_float(name, w, (out_f, in_f))
        t, b = ternarize_absmean(w)
        beta = float(b)
    if not bool(t.any()):
        raise ConversionError(f"tensor {name!r} is all zeros after ternarization (a broken upload?)")
    return t, beta


def _weight_scale(ckpt: Checkpoint, name: str, mode: str) -> float:
    s = ckpt.get(name).float().flatten()
    if s.numel() != 1:
        raise ConversionError(f"tensor {name!r} should hold one per-tensor scale, got shape {tuple(s.shape)}")
    v = float(s[0])
    if not math.isfinite(v) or v <= 0:
        raise ConversionError(f"tensor {name!r} holds an invalid scale {v}")
    return v if mode == "multiply" else 1.0 / v


def build_tensors(ckpt: Checkpoint, layout: Layout, dtype: torch.dtype | None, progress: bool
                  ) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    cfg, n = layout.config, layout.names
    h, v = cfg.hidden_size, cfg.vocab_size

    def floats(role: str, shape: tuple[int, ...], i: int | None = None) -> torch.Tensor:
        name = n[role].format(i=i)
        t = _check_float(name, ckpt.get(name), shape)
        if dtype is not None:
            t = t.to(dtype)
            if not bool(torch.isfinite(t).all()):
                raise ConversionError(f"tensor {name!r} overflows {dtype} (values beyond its range); choose a "
                                      f"wider --dtype")
        return t

    out: dict[str, torch.Tensor] = {"embed_tokens": floats("embed", (v, h)), "norm": floats("norm", (h,))}
    if not cfg.tie_word_embeddings:
        out["lm_head"] = floats("lm_head", (v, h))
    dims = {"q": (cfg.q_size, h), "k": (cfg.kv_size, h), "v": (cfg.kv_size, h), "o": (h, cfg.q_size),
            "gate": (cfg.intermediate_size, h), "up": (cfg.intermediate_size, h), "down": (h, cfg.intermediate_size)}
    disable = not progress or not sys.stderr.isatty()
    for i in tqdm(range(cfg.num_layers), desc="converting layers", unit="layer", disable=disable):
        p = f"layers.{i}."
        out[p + "input_norm"] = floats("input_norm", (h,), i)
        out[p + "post_attn_norm"] = floats("post_attn_norm", (h,), i)
        if cfg.attn_sub_norm:
            out[p + "attn_sub_norm"] = floats("attn_sub_norm", (cfg.q_size,), i)
        if cfg.ffn_sub_norm:
            out[p + "ffn_sub_norm"] = floats("ffn_sub_norm", (cfg.intermediate_size,), i)
        for group, (members, layout_kind) in GROUPS.items():
            parts, betas = [], []
            for proj in members:
                t, beta = _load_projection(ckpt, layout, n[proj].format(i=i), *dims[proj])
                parts.append(t)
                betas.append(beta)
            _, segs, _ = group_geometry(cfg, group)
            assert [t.shape[0] for t in parts] == segs
            out[p + group + ".packed"] = pack_ternary(parts, layout_kind)
            out[p + group + ".scales"] = torch.tensor(betas, dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------------


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):  # serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [x for x in value if isinstance(x, int) and not isinstance(x, bool)]
    return []


def read_tokenizer(src: Path, hf: dict[str, Any], vocab_size: int) -> tuple[dict[str, Any], bytes | None]:
    """-> (tokenizer metadata for the engine file, raw tokenizer bytes or None)."""
    from ..model.tokenizer import Tokenizer

    if (src / "tokenizer.model").is_file():
        kind, data = "sentencepiece", (src / "tokenizer.model").read_bytes()
    elif (src / "tokenizer.json").is_file():
        kind, data = "hf_json", (src / "tokenizer.json").read_bytes()
    else:
        warnings.warn(f"{src} has no tokenizer.model or tokenizer.json; the engine file will take token ids only")
        return {"kind": "none"}, None
    try:
        tok = Tokenizer(kind, data)
    except ValueError as e:
        raise ConversionError(f"cannot read the tokenizer in {src}: {e}") from None
    if tok.vocab_size > vocab_size:
        warnings.warn(f"the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size}; ids past the "
                      f"model's vocabulary will be rejected")
    tc = _read_json(src / "tokenizer_config.json")
    gen = _read_json(src / "generation_config.json")
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        s = _token_str(tc.get(key))
        if s is None and kind == "sentencepiece":  # fall back to the model's own pieces
            sp_id = {"bos_token": tok._sp.bos_id(), "eos_token": tok._sp.eos_id(), "unk_token": tok._sp.unk_id(),
                     "pad_token": tok._sp.pad_id()}[key]
            s = tok.id_to_token(sp_id) if sp_id >= 0 else None
        if s is not None:
            special[key] = s

    def valid(ids: list[int]) -> list[int]:
        return [i for i in ids if 0 <= i < vocab_size]

    def by_name(key: str) -> list[int]:
        tid = tok.token_to_id(special[key]) if key in special else None
        return [tid] if tid is not None else []

    bos = valid(_ids(hf.get("bos_token_id"))) or valid(by_name("bos_token"))
    if not bos and kind == "sentencepiece" and tok.bos_id is not None:
        bos = valid([tok.bos_id])
    eos: list[int] = []
    for i in valid(_ids(gen.get("eos_token_id"))) + valid(_ids(hf.get("eos_token_id"))) + valid(by_name("eos_token")):
        if i not in eos:
            eos.append(i)
    if not eos and kind == "sentencepiece":
        eos = valid(tok.eos_ids)
    pad = valid(_ids(hf.get("pad_token_id"))) or valid(by_name("pad_token"))
    template = tc.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (src / "chat_template.jinja").is_file():
        template = (src / "chat_template.jinja").read_text()
    if template is None and (src / "chat_template.json").is_file():
        template = _read_json(src / "chat_template.json").get("chat_template")
    info = {"kind": kind, "bos_id": bos[0] if bos else None, "eos_ids": eos, "pad_id": pad[0] if pad else None,
            "chat_template": template if isinstance(template, str) else None, "special_tokens": special}
    return info, data


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def _check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse a destination that would destroy an input or a non-file (a device node, a FIFO)."""
    if dst.is_dir():
        raise ConversionError(f"{dst} is a directory; give a file path for the engine file")
    if dst.exists() and not dst.is_file():
        raise ConversionError(f"{dst} is not a regular file; refusing to replace it")
    if src.is_dir():
        inside = dst.resolve().parent == src.resolve()
        if inside and dst.suffix in (".safetensors", ".json", ".model", ".jinja"):
            raise ConversionError(f"{dst} is (or would become) one of the checkpoint's own files in {src}; "
                                  f"write the engine file elsewhere")
        if dst.exists() and any(f.is_file() and os.path.samefile(f, dst) for f in src.iterdir()):
            raise ConversionError(f"{dst} is one of the checkpoint's own files in {src}; write the engine file "
                                  f"elsewhere")
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} already exists; pass force=True (--force) to overwrite it")


def _source_note(arch: str, src: Path) -> str:
    """Where the model came from, without the converting machine's absolute paths: the folder relative to the
    working directory when it lies inside it, else its name."""
    try:
        where = src.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        where = src.resolve().name
    return f"{arch} from {where}"


def convert(src: str | Path, dst: str | Path, sparsity: SparsityConfig | str | float | None = None,
            dtype: str | torch.dtype | None = None, force: bool = False, progress: bool = True,
            ternarize: bool = False, lm_head: str = "bf16", topk_rescale: str | None = None) -> Path:
    """Convert the Hugging Face folder `src` into the engine file `dst`; returns `dst`. ternarize=True
    converts a BitNetForCausalLM without quantization_config (a full-precision model to transformers).
    lm_head="int8" also stores the int8 head (head_int8.py) beside the float one. Full-precision families
    (convert/dense.py): dtype defaults to bf16; topk_rescale ("none" | "l2", default: the checkpoint's
    q_sparse record, else "none") says whether the model was trained with the L2 re-scale after its top-K."""
    from ..model.head_int8 import LM_HEAD_MODES, Q8, Q8_SCALES, head_source, quantize_head

    if lm_head not in LM_HEAD_MODES:
        raise ConversionError(f"lm_head must be one of {LM_HEAD_MODES}, got {lm_head!r}")
    src, dst = Path(src), Path(dst)
    _check_destination(src, dst, force)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a checkpoint folder")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json")
    hf = _read_json(src / "config.json")
    archs = hf.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    arch = next((a for a in archs if a in ARCHITECTURES or a in DENSE_ARCHITECTURES), None)
    if arch is None:
        raise ConversionError(f"unsupported architecture {archs or '(none given)'} in {src / 'config.json'}; "
                              f"supported: {sorted([*ARCHITECTURES, *DENSE_ARCHITECTURES])}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if topk_rescale not in (None, *TOPK_RESCALES):
        raise ConversionError(f"topk_rescale must be one of {TOPK_RESCALES}, got {topk_rescale!r}")
    if isinstance(sparsity, SparsityConfig) or sparsity is None:
        requested = sparsity
    elif isinstance(sparsity, str):
        requested = SparsityConfig.parse(sparsity)
    else:
        requested = SparsityConfig.uniform(float(sparsity))
    ckpt = Checkpoint(src)
    if arch in DENSE_ARCHITECTURES:
        from .dense import convert_dense

        if lm_head != "bf16":
            raise ConversionError("--lm-head int8 is for ternary models; a full-precision model keeps its head")
        return convert_dense(src, dst, hf, arch, ckpt, requested, dtype, topk_rescale, progress, force,
                             lambda vocab: read_tokenizer(src, hf, vocab), _source_note(arch, src),
                             _hf_sparsity(hf))
    if topk_rescale not in (None, "none"):
        raise ConversionError("topk_rescale 'l2' needs a full-precision model (the ternary kernels have none)")
    layout = read_bitnet(hf, ckpt, ternarize) if arch == "BitNetForCausalLM" else ARCHITECTURES[arch](hf, ckpt)
    sp = requested or layout.recorded_sparsity or SparsityConfig()
    tensors = build_tensors(ckpt, layout, dtype, progress)
    if lm_head == "int8":
        tensors[Q8], tensors[Q8_SCALES] = quantize_head(head_source(tensors))
    unused = sorted(n for n in set(ckpt.where) - ckpt.used
                    if not n.endswith("rotary_emb.inv_freq") and not (n == layout.names["lm_head"]
                                                                     and layout.config.tie_word_embeddings))
    if unused:  # most likely a layout this converter does not know (e.g. differently named sub-norms)
        more = f" and {len(unused) - 8} more" if len(unused) > 8 else ""
        warnings.warn(f"{len(unused)} checkpoint tensors are not used by the converted model: {unused[:8]}{more}")
    info, tok_bytes = read_tokenizer(src, hf, layout.config.vocab_size)
    check_topk(layout.config, sp)
    return write_engine(dst, layout.config, sp, tensors, info, tok_bytes, _source_note(arch, src), overwrite=force)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer)")
    parser.add_argument("dst", help="engine file to write")
    parser.add_argument("--sparsity", default=None,
                        help="one ratio for all groups, attn,o,mlp,down, attn,o,gate,up,down (distinct gate and up: "
                             "full precision only) or named (attn=0.5,gate=0.6) (default: the checkpoint's, else 0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of non-ternary tensors (default: keep the checkpoint's; bf16 for Llama, Mistral "
                             "and Qwen2)")
    parser.add_argument("--topk-rescale", choices=TOPK_RESCALES, default=None,
                        help="full precision: the model was trained with the L2 re-scale after its top-K (l2) or not "
                             "(default: the checkpoint's q_sparse record, else none)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    parser.add_argument("--lm-head", choices=("bf16", "int8"), default="bf16",
                        help="int8: also store a per-row absmax int8 LM head (half the head's bytes per token)")
    parser.add_argument("--ternarize", action="store_true",
                        help="convert a BitNetForCausalLM without quantization_config (full precision to "
                             "transformers) by ternarizing it: its outputs will differ from transformers'")


def run(args: argparse.Namespace) -> int:
    dst = convert(args.src, args.dst, sparsity=args.sparsity, dtype=args.dtype, force=args.force,
                  lm_head=args.lm_head, ternarize=args.ternarize, topk_rescale=args.topk_rescale)
    from ..model.format import read_metadata

    ef = read_metadata(dst)  # the header only: a 16 GB file is not read back
    c = ef.config
    print(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB, format v{ef.format_version}, {c.precision}): "
          f"{c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}, sparsity {ef.sparsity.describe()}"
          f"{', L2 re-scale' if c.topk_rescale == 'l2' else ''}, tokenizer {ef.tokenizer_info.get('kind')}"
          + (", int8 LM head" if "lm_head.q8" in ef.header else ""))
    return 0
