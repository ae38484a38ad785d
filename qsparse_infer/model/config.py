"""Model and sparsity configuration: the shapes and ratios every other module agrees on."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("relu2", "silu")
SPARSITY_GROUPS = ("attn", "o", "mlp", "down")
# The five-ratio form of --sparsity: gate and up apart (the paper's gate is sparser); "gate" is field `mlp`.
SPARSITY_GROUPS_SPLIT = ("attn", "o", "gate", "up", "down")
# "ternary": BitNet b1.58 (2-bit packed weights, int8 activations); "bf16": full precision (bf16 weights as
# checkpoints carry them, fp32 activations), the Llama / Mistral / Qwen2 family (docs/ARCHITECTURE.md).
PRECISIONS = ("ternary", "bf16")
# What follows the top-K: nothing, or the paper's L2 re-scale (quant.sparsify_topk gives the exact rule).
TOPK_RESCALES = ("none", "l2")
ROPE_TYPES = ("linear", "llama3")
# Fields added by format version 2, with the value a version-1 file implies (format.required_version).
V2_MODEL_FIELDS = {"precision": "ternary", "attn_bias": False, "rope_scaling": None, "topk_rescale": "none"}


@dataclass
class ModelConfig:
    """A Llama-style pre-norm decoder: BitNet b1.58 projections (precision "ternary"), or full-precision ones
    (precision "bf16": Llama, Mistral, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    activation: str = "relu2"  # "relu2" (ReLU²-GLU) or "silu" (SiLU-GLU)
    attn_sub_norm: bool = True  # RMSNorm on the attention output, before o_proj
    ffn_sub_norm: bool = True  # RMSNorm on the GLU output, before down_proj
    tie_word_embeddings: bool = False
    # format version 2 (the defaults are what a version-1 file means)
    precision: str = "ternary"
    attn_bias: bool = False  # biases on q, k and v (Qwen2); never on o, gate, up, down
    # None: plain RoPE. {"rope_type": "linear", "factor"} or {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} (reference.rope_inv_freq has the formulas)
    rope_scaling: dict | None = None
    topk_rescale: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"config.{name} must be a finite number > 0, got {value!r}")
        for name in ("attn_sub_norm", "ffn_sub_norm", "tie_word_embeddings", "attn_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be true or false, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"config.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"config.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.topk_rescale not in TOPK_RESCALES:
            raise ValueError(f"config.topk_rescale must be one of {TOPK_RESCALES}, got {self.topk_rescale!r}")
        if self.precision == "ternary" and (self.attn_bias or self.topk_rescale != "none"):
            raise ValueError("config.attn_bias and config.topk_rescale = 'l2' need precision 'bf16' (the ternary "
                             "kernels have neither)")
        validate_rope_scaling(self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def needs_v2(self) -> bool:
        """True when a field of format version 2 differs from what a version-1 file implies."""
        return any(getattr(self, k) != v for k, v in V2_MODEL_FIELDS.items())

    def to_dict_v1(self) -> dict[str, Any]:
        """The dict a version-1 reader knows (only for configs with needs_v2() false)."""
        if self.needs_v2():
            raise ValueError("this config needs format version 2")
        return {k: v for k, v in self.to_dict().items() if k not in V2_MODEL_FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))


def validate_rope_scaling(rs: Any) -> None:
    """None, or a dict of a supported rope_type with finite positive parameters."""
    if rs is None:
        return
    if not isinstance(rs, dict):
        raise ValueError(f"config.rope_scaling must be an object or null, got {rs!r}")
    kind = rs.get("rope_type")
    if kind not in ROPE_TYPES:
        raise ValueError(f"config.rope_scaling.rope_type must be one of {ROPE_TYPES}, got {kind!r}")
    keys = {"linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}[kind]
    extra = sorted(set(rs) - {"rope_type", *keys})
    if extra:
        raise ValueError(f"config.rope_scaling ({kind}) has unknown keys {extra}")
    for key in keys:
        v = rs.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"config.rope_scaling.{key} must be a finite number > 0, got {v!r}")
    if kind == "llama3" and not rs["high_freq_factor"] > rs["low_freq_factor"]:
        raise ValueError("config.rope_scaling: high_freq_factor must exceed low_freq_factor")


@dataclass
class SparsityConfig:
    """Fraction of input channels *dropped* before each projection group (0 = dense).

    attn: input of q/k/v; o: input of o_proj; mlp: input of gate_proj (and of up_proj unless `up` is set);
    up: input of up_proj when it differs from the gate's (format v2; full precision only: the ternary kernels
    share one selection for gate and up); down: input of down_proj (after the GLU: SiLU(gate) * up for SiLU
    models, as the paper puts it); lm_head: input of the LM head (kept dense and unquantized, only top-K masked,
    when > 0).
    """

    attn: float = 0.0
    o: float = 0.0
    mlp: float = 0.0
    down: float = 0.0
    lm_head: float = 0.0
    up: float | None = None

    def __post_init__(self) -> None:
        for name in (*SPARSITY_GROUPS, "lm_head", "up"):
            value = getattr(self, name)
            if name == "up" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"sparsity.{name} must be a number in [0, 1), got {value!r}")
            setattr(self, name, float(value))
        if self.up == self.mlp:  # one ratio for gate and up: the version-1 form
            self.up = None

    @property
    def gate(self) -> float:
        return self.mlp

    @property
    def up_ratio(self) -> float:
        """The ratio of up_proj's input (the gate's unless `up` is set)."""
        return self.mlp if self.up is None else self.up

    @property
    def split_gate_up(self) -> bool:
        return self.up is not None and self.up != self.mlp

    @classmethod
    def uniform(cls, s: float) -> "SparsityConfig":
        return cls(attn=s, o=s, mlp=s, down=s)

    @classmethod
    def parse(cls, text: str) -> "SparsityConfig":
        """Parse "0.6" (all groups), "attn,o,mlp,down" such as "0.5,0.5,0.6,0.6", "attn,o,gate,up,down"
        such as "0.5,0.5,0.6,0.4,0.5", or named ratios "attn=0.5,gate=0.6,up=0.4" (unnamed groups: 0;
        "mlp" sets gate and up, "all" every group, lm_head only by name)."""
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if parts and all("=" in p for p in parts):
            return cls._parse_named(text, parts)
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"sparsity must be one ratio, four (attn,o,mlp,down), five (attn,o,gate,up,down) or "
                             f"named ratios (attn=0.5,gate=0.6), got {text!r}") from None
        if len(values) == 1:
            return cls.uniform(values[0])
        if len(values) == len(SPARSITY_GROUPS):
            return cls(**dict(zip(SPARSITY_GROUPS, values)))
        if len(values) == len(SPARSITY_GROUPS_SPLIT):
            a, o, gate, up, down = values
            return cls(attn=a, o=o, mlp=gate, up=up, down=down)
        raise ValueError(f"sparsity must be one ratio, four (attn,o,mlp,down) or five (attn,o,gate,up,down), "
                         f"got {text!r}")

    @classmethod
    def _parse_named(cls, text: str, parts: list[str]) -> "SparsityConfig":
        names = {"all", "attn", "o", "mlp", "gate", "up", "down", "lm_head"}
        values: dict[str, float] = {}
        for p in parts:
            key, _, raw = (x.strip() for x in p.partition("="))
            if key not in names:
                raise ValueError(f"sparsity: unknown group {key!r} in {text!r} (groups: {sorted(names)})")
            try:
                values[key] = float(raw)
            except ValueError:
                raise ValueError(f"sparsity: {key}={raw!r} is not a number") from None
        base = values.get("all", 0.0)
        mlp = values.get("gate", values.get("mlp", base))
        up = values.get("up", values.get("mlp", base))
        return cls(attn=values.get("attn", base), o=values.get("o", base), mlp=mlp, down=values.get("down", base),
                   lm_head=values.get("lm_head", 0.0), up=up)

    def to_dict(self) -> dict[str, float]:
        d = dataclasses.asdict(self)
        if d["up"] is None:  # what a version-1 file holds
            del d["up"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparsityConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown sparsity keys: {sorted(unknown)}")
        return cls(**d)

    def describe(self) -> str:
        groups = ("attn", "o", "mlp", "down", "lm_head") if not self.split_gate_up else \
            ("attn", "o", "gate", "up", "down", "lm_head")
        return ", ".join(f"{g}={getattr(self, g if g != 'up' else 'up_ratio'):g}" for g in groups)


def topk_count(dim: int, sparsity: float) -> int:
    """K = int((1 - S) * D): the number of input channels a token keeps. Computed once, on the host,
    so the CPU reference and every GPU kernel agree on it exactly."""
    return int((1.0 - sparsity) * dim)


def check_topk(cfg: ModelConfig, sparsity: SparsityConfig) -> None:
    """Raise ValueError when a ratio keeps K = 0 input channels of its projection (the output would be
    only the bias-free zero vector: garbage without a word), or asks a ternary model for distinct gate and up
    ratios (its kernels select once for both)."""
    if sparsity.split_gate_up and cfg.precision == "ternary":
        raise ValueError(f"sparsity up = {sparsity.up:g} differs from mlp (gate) = {sparsity.mlp:g}: distinct gate "
                         f"and up ratios need a full-precision model (ternary kernels select once for both)")
    dims = {"attn": cfg.hidden_size, "o": cfg.q_size, "mlp": cfg.hidden_size, "up": cfg.hidden_size,
            "down": cfg.intermediate_size, "lm_head": cfg.hidden_size}
    for group, dim in dims.items():
        ratio = getattr(sparsity, group if group != "up" else "up_ratio")
        if topk_count(dim, ratio) < 1:
            raise ValueError(f"sparsity.{group} = {ratio:g} keeps K = 0 of {dim} input channels; use a smaller ratio "
                             f"(at most {1 - 1 / dim:.6g})")
