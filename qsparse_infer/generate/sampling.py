"""Sampling settings and the CPU implementation of the sampling rules (the GPU kernel in
csrc/decode/sample.cu follows the same rules, with the same counter-based random numbers).

Rules, for logits x [V] fp32 at generation step `step`:
  1. Repetition penalty rp on every token seen so far (prompt included): x < 0 ? x * rp : x / rp.
     Then OpenAI's additive penalties on the tokens generated so far in this completion (the prompt does not
     count), c_i = how often token i was generated: x_i - (frequency_penalty * c_i + presence_penalty * [c_i > 0]),
     each operation rounded to fp32 in that order (the GPU uses non-contracting intrinsics for the same bits).
  2. temperature == 0 (or below MIN_TEMPERATURE): greedy, argmax of x, the lower index wins ties.
  3. Else z = x / temperature. Keep tokens with z >= tau, tau = max of
     - tau_k: the top_k-th largest z (top_k > 0), ties at the threshold all kept;
     - tau_p: the largest value such that the softmax mass of the kept tokens with z >= tau_p reaches
       top_p (top_p < 1), i.e. the smallest head of the sorted distribution (ties kept together) whose
       mass is at least top_p.
  4. Gumbel-max draw: argmax over kept tokens of z + g_i, g_i = -log(-log(u_i)) with u_i from a
     splitmix64 hash of (seed, step, i); a seed therefore fixes the whole generation.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

_M64 = (1 << 64) - 1
# Below this a temperature acts greedy: sampling at it is greedy in all but exact ties anyway, and dividing
# fp32 logits by a temperature near 1e-39 overflows to inf (inf - inf = NaN in the softmax).
MIN_TEMPERATURE = 1e-6


@dataclass
class SamplingSettings:
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's additive penalties, -2..2 (rule 1)
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
            setattr(self, name, float(v))
        self.temperature = float(self.temperature)
        if self.temperature < MIN_TEMPERATURE:  # logits / such a temperature would overflow fp32
            self.temperature = 0.0
        self.top_p = float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)

    def resolved_seed(self) -> int:
        """The seed as the 64-bit value both samplers use (a fresh random one when unset)."""
        if self.seed is None:
            return int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
        return self.seed & ((1 << 63) - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def additive_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def hash_uniform(seed: int, step: int, n: int) -> np.ndarray:
    """u_i in (0, 1) for i < n, bit-identical to hash_uniform in csrc/decode/sample.cu (float32)."""
    key = (seed ^ ((step * 0xD1B54A32D192ED03) & _M64)) & _M64
    with np.errstate(over="ignore"):
        i = np.arange(1, n + 1, dtype=np.uint64)
        x = np.uint64(key) + i * np.uint64(0x9E3779B97F4A7C15)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (((x >> np.uint64(41)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 8388608.0))


def apply_repetition_penalty(x: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return x
    pen = torch.where(x < 0, x * penalty, x / penalty)
    return torch.where(seen, pen, x)


def apply_additive_penalties(x: torch.Tensor, counts: torch.Tensor | None, presence: float,
                             frequency: float) -> torch.Tensor:
    """Rule 1's OpenAI penalties: counts int [V] = how often each token was generated in this completion."""
    if presence == 0.0 and frequency == 0.0:
        return x
    if counts is None:
        raise ValueError("presence/frequency penalties need the counts of the tokens generated so far")
    c = counts.to(torch.float32)
    f32 = torch.float32
    pen = torch.tensor(frequency, dtype=f32) * c + torch.where(c > 0, torch.tensor(presence, dtype=f32),
                                                                torch.tensor(0.0, dtype=f32))
    return x - pen


def keep_threshold(z: torch.Tensor, top_k: int, top_p: float) -> float:
    """The value tau of rule 3 (tokens with z >= tau are kept); -inf when neither filter applies."""
    v = z.numel()
    tau = float("-inf")
    if 0 < top_k < v:
        tau = float(torch.topk(z, top_k).values[-1])
    if top_p < 1.0:
        m = z.max()
        # fixed point 2^-40, as the GPU accumulates it (integer sums: order-independent)
        w = torch.where(z >= tau, torch.floor(torch.exp(z - m) * 2.0 ** 40), torch.zeros_like(z)).to(torch.int64)
        total = int(w.sum())
        p32 = float(np.float32(top_p))  # the GPU receives top_p as float32
        target = max(1, int(np.ceil(p32 * float(total))))
        order = torch.sort(z, descending=True, stable=True)
        zs, ws = order.values, w[order.indices]
        # mass of {z >= zs[j]} includes every tie of zs[j]: evaluate the cumulative sum at the last tie
        cum = torch.cumsum(ws, 0)
        last_of_tie = torch.ones_like(zs, dtype=torch.bool)
        last_of_tie[:-1] = zs[1:] != zs[:-1]
        ok = last_of_tie & (cum >= target)
        j = int(torch.nonzero(ok)[0]) if ok.any() else v - 1
        tau = max(tau, float(zs[j]))
    return tau


def sample_cpu(logits: torch.Tensor, settings: SamplingSettings, seen: torch.Tensor, seed: int, step: int,
               counts: torch.Tensor | None = None) -> int:
    """One token from fp32 logits [V] on the CPU, by the rules above. seen: bool [V]; counts: int [V], the
    generated-token counts (needed only with presence/frequency penalties)."""
    x = logits.detach().float().cpu().reshape(-1)
    x = torch.nan_to_num(x, nan=float("-inf"))
    x = apply_repetition_penalty(x, seen, settings.repetition_penalty)
    x = apply_additive_penalties(x, counts, settings.presence_penalty, settings.frequency_penalty)
    if settings.greedy:
        return int(torch.argmax(x))  # torch.argmax returns the first maximal index
    z = x / torch.tensor(settings.temperature, dtype=torch.float32)  # fp32 division, as on the GPU
    tau = keep_threshold(z, settings.top_k, settings.top_p)
    u = torch.from_numpy(hash_uniform(seed, step, z.numel()))
    g = -torch.log(-torch.log(u))
    score = torch.where(z >= tau, z + g, torch.full_like(z, float("-inf")))
    return int(torch.argmax(score))
