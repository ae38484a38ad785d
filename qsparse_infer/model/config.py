"""Model and sparsity configuration: the shapes and ratios every other module agrees on."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("relu2", "silu")
SPARSITY_GROUPS = ("attn", "o", "mlp", "down")


@dataclass
class ModelConfig:
    """A Llama-style pre-norm decoder with BitNet b1.58 projections."""

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
        for name in ("attn_sub_norm", "ffn_sub_norm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be true or false, got {getattr(self, name)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"config.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"config.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config.head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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


@dataclass
class SparsityConfig:
    """Fraction of input channels *dropped* before each projection group (0 = dense).

    attn: input of q/k/v; o: input of o_proj; mlp: input of gate/up; down: input of down_proj;
    lm_head: input of the LM head (kept dense and unquantized, only top-K masked, when > 0).
    """

    attn: float = 0.0
    o: float = 0.0
    mlp: float = 0.0
    down: float = 0.0
    lm_head: float = 0.0

    def __post_init__(self) -> None:
        for name in (*SPARSITY_GROUPS, "lm_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"sparsity.{name} must be a number in [0, 1), got {value!r}")
            setattr(self, name, float(value))

    @classmethod
    def uniform(cls, s: float) -> "SparsityConfig":
        return cls(attn=s, o=s, mlp=s, down=s)

    @classmethod
    def parse(cls, text: str) -> "SparsityConfig":
        """Parse "0.6" (all four groups) or "attn,o,mlp,down" such as "0.5,0.5,0.6,0.6"."""
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"sparsity must be one ratio or four comma-separated ratios, got {text!r}") from None
        if len(values) == 1:
            return cls.uniform(values[0])
        if len(values) == len(SPARSITY_GROUPS):
            return cls(**dict(zip(SPARSITY_GROUPS, values)))
        raise ValueError(f"sparsity must be one ratio or four (attn,o,mlp,down), got {text!r}")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparsityConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown sparsity keys: {sorted(unknown)}")
        return cls(**d)

    def describe(self) -> str:
        return ", ".join(f"{g}={getattr(self, g):g}" for g in (*SPARSITY_GROUPS, "lm_head"))


def topk_count(dim: int, sparsity: float) -> int:
    """K = int((1 - S) * D): the number of input channels a token keeps. Computed once, on the host,
    so the CPU reference and every GPU kernel agree on it exactly."""
    return int((1.0 - sparsity) * dim)


def check_topk(cfg: ModelConfig, sparsity: SparsityConfig) -> None:
    """Raise ValueError when a ratio keeps K = 0 input channels of its projection (the output would be
    only the bias-free zero vector: garbage without a word)."""
    dims = {"attn": cfg.hidden_size, "o": cfg.q_size, "mlp": cfg.hidden_size, "down": cfg.intermediate_size,
            "lm_head": cfg.hidden_size}
    for group, dim in dims.items():
        ratio = getattr(sparsity, group)
        if topk_count(dim, ratio) < 1:
            raise ValueError(f"sparsity.{group} = {ratio:g} keeps K = 0 of {dim} input channels; use a smaller ratio "
                             f"(at most {1 - 1 / dim:.6g})")
