"""The full-precision Hugging Face families: config.json of LlamaForCausalLM, MistralForCausalLM or
Qwen2ForCausalLM -> a ModelConfig (precision "bf16") and the tensor name of every role.

Shared by `qsparse convert` (convert/dense.py) and `qsparse train --init-from` (train/), which both read these
folders. What is taken from config.json:
- shapes: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads (GQA;
  default: the head count), head_dim (default hidden / heads), vocab_size, max_position_embeddings;
- rms_norm_eps (default 1e-6), hidden_act (silu only), tie_word_embeddings (or no lm_head.weight: tied);
- RoPE: rope_theta (top level, or inside rope_parameters as transformers 5 writes it), and the scaling in
  rope_scaling / rope_parameters: default, "linear" (factor) or "llama3"; other kinds (dynamic, yarn, longrope)
  are refused;
- Qwen2's q/k/v biases (always present in that family); a Llama with attention_bias or mlp_bias is refused
  (o / MLP biases have no place in the engine), as is any quantization_config (GPTQ, AWQ, bitsandbytes);
- a sliding window (Mistral v0.1's sliding_window, Qwen2's use_sliding_window) shorter than the context caps
  the context at the window: within it, windowed attention equals full attention, so the engine stays exact;
- the record of a Q-Sparse finetune (`q_sparse`: {"sparsity": ..., "topk_rescale": "none" | "l2"}), written by
  `qsparse train --init-from`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ModelConfig

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ROPE_KINDS = ("default", "linear", "llama3")


@dataclass
class DenseLayout:
    arch: str
    config: ModelConfig
    names: dict[str, str]  # role -> tensor name; layer roles contain "{i}"
    notes: list[str] = field(default_factory=list)  # what the reader changed or assumed (shown as warnings)
    recorded: dict[str, Any] = field(default_factory=dict)  # the q_sparse record, if any


def hf_names(bias: bool) -> dict[str, str]:
    """The transformers tensor names of the Llama family (the same in all three architectures)."""
    layer = "model.layers.{i}."
    names = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight",
             "input_norm": layer + "input_layernorm.weight",
             "post_attn_norm": layer + "post_attention_layernorm.weight"}
    for p in ("q", "k", "v", "o"):
        names[p] = layer + f"self_attn.{p}_proj.weight"
    for p in ("gate", "up", "down"):
        names[p] = layer + f"mlp.{p}_proj.weight"
    if bias:
        for p in ("q", "k", "v"):
            names[p + "_bias"] = layer + f"self_attn.{p}_proj.bias"
    return names


def _rope(hf: dict[str, Any]) -> tuple[float, dict | None]:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"config.json: rope_scaling must be an object or null, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    if kind not in ROPE_KINDS:
        raise ValueError(f"RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_KINDS)})")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), {"rope_type": "linear", "factor": float(rope.get("factor", math.nan))}
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rope]
    if missing:
        raise ValueError(f"config.json: llama3 RoPE scaling lacks {missing}")
    return float(theta), {"rope_type": "llama3", **{k: float(rope[k]) for k in keys}}


def _window(hf: dict[str, Any], arch: str) -> int | None:
    """The attention window, where the model has one."""
    w = hf.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
        return None
    if w is None or isinstance(w, bool):
        return None
    return int(w)


def read_dense_config(hf: dict[str, Any], arch: str, has: Callable[[str], bool]) -> DenseLayout:
    """config.json (a dict) of one of DENSE_ARCHITECTURES -> DenseLayout. `has(name)` says whether the
    checkpoint holds a tensor (for tied heads and biases). Raises ValueError naming what is wrong."""
    if arch not in DENSE_ARCHITECTURES:
        raise ValueError(f"{arch!r} is not a full-precision family this engine reads ({DENSE_ARCHITECTURES})")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) \
            else hf["quantization_config"]
        raise ValueError(f"config.json has a quantization_config ({method!r}): quantized {arch} checkpoints are "
                         f"not supported; give the bf16/fp16 weights")
    if arch == "LlamaForCausalLM" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ValueError("a LlamaForCausalLM with attention_bias or mlp_bias is not supported (the engine has "
                         "q/k/v biases only, as Qwen2 uses them)")
    notes: list[str] = []
    bias = arch == "Qwen2ForCausalLM"
    names = hf_names(bias)
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if heads <= 0:
            raise ValueError(f"config.json: num_attention_heads must be > 0, got {heads}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported for {arch} (silu)")
        tied = bool(hf.get("tie_word_embeddings", False))
        if not tied and not has(names["lm_head"]):
            tied = True
            notes.append("the checkpoint has no lm_head.weight although tie_word_embeddings is false: the LM head "
                         "is tied to the embedding")
        max_len = int(hf.get("max_position_embeddings", 2048))
        window = _window(hf, arch)
        if window is not None and window < max_len:
            notes.append(f"the context is capped at the sliding window of {window} positions (of {max_len}): "
                         f"within it, windowed and full attention agree")
            max_len = window
        theta, scaling = _rope(hf)
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]), hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads), max_seq_len=max_len, rope_theta=theta,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), activation="silu", attn_sub_norm=False,
            ffn_sub_norm=False, tie_word_embeddings=tied, precision="bf16", attn_bias=bias, rope_scaling=scaling,
            topk_rescale=_recorded(hf).get("topk_rescale", "none"))
    except KeyError as e:
        raise ValueError(f"config.json lacks required key {e.args[0]!r}") from None
    except TypeError as e:  # e.g. "hidden_size": null
        raise ValueError(f"config.json describes an invalid model: {e}") from None
    except ValueError as e:
        if str(e).startswith(("config.", "config.json", "hidden_act", "RoPE", "sparsity")):
            raise
        raise ValueError(f"config.json describes an invalid model: {e}") from None
    return DenseLayout(arch, cfg, names, notes, _recorded(hf))


def _recorded(hf: dict[str, Any]) -> dict[str, Any]:
    rec = hf.get("q_sparse")
    return rec if isinstance(rec, dict) else {}


def checkpoint_dtype(hf: dict[str, Any]) -> str | None:
    """The dtype config.json names ("bfloat16", "float16", "float32"), if any."""
    d = hf.get("dtype", hf.get("torch_dtype"))
    return d if isinstance(d, str) else None
