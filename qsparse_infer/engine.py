"""`Engine`: load an engine file and run it on the GPU (CUDA kernels) or the CPU (the reference model)."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .generate import generation
from .model.config import SparsityConfig, check_topk
from .model.format import EngineFile, build_reference, read_engine

BUILTIN_MODEL = Path(__file__).resolve().parent / "data" / "shakespeare.qsp"


def _resolve_sparsity(value: SparsityConfig | str | float | None, default: SparsityConfig) -> SparsityConfig:
    if value is None:
        return default
    if isinstance(value, SparsityConfig):
        return value
    if isinstance(value, str):
        return SparsityConfig.parse(value)
    return SparsityConfig.uniform(float(value))


KV_CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Engine:
    """A loaded model. Attributes: config, sparsity, tokenizer (None if the file has none), device,
    file (EngineFile), model (the reference Transformer, CPU, built lazily) and, on "cuda", gpu (the GPU decoder)."""

    def __init__(self, file: EngineFile, device: str, sparsity: SparsityConfig, kv_cache: str = "bf16",
                 decode_kernel: str = "multi") -> None:
        from .model.tokenizer import Tokenizer

        self.file = file
        self.config = file.config
        self.sparsity = sparsity
        self.device = device
        self.tokenizer = (Tokenizer.from_engine_file(file)
                          if file.tokenizer_info.get("kind", "none") != "none" else None)
        self._model: torch.nn.Module | None = None
        self.auto_cpu_fallback = False
        self.gpu = None
        if kv_cache not in KV_CACHE_DTYPES:  # checked on the CPU too, so a typo fails where it is written
            raise ValueError(f"kv_cache must be one of {sorted(KV_CACHE_DTYPES)}, got {kv_cache!r}")
        from .gpu.model import DECODE_KERNELS  # importable without a GPU

        if decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel must be one of {', '.join(DECODE_KERNELS)}, got {decode_kernel!r}")
        if decode_kernel == "persistent" and device != "cuda":
            raise ValueError("the persistent decode kernel needs a GPU (device=\"cuda\")")
        check_topk(self.config, sparsity)
        if device == "cuda":
            from .gpu.model import GpuModel

            self.gpu = GpuModel(self.file, self.sparsity, kv_dtype=KV_CACHE_DTYPES[kv_cache],
                                decode_kernel=decode_kernel)

    @classmethod
    def load(cls, path: str | Path | None = None, device: str = "auto",
             sparsity: SparsityConfig | str | float | None = None, kv_cache: str = "bf16",
             lm_head: str | None = None, decode_kernel: str = "multi") -> "Engine":
        """Load an engine file (None: the built-in Shakespeare model). device: "auto", "cuda" or "cpu".
        sparsity overrides the ratios stored in the file. kv_cache ("bf16" or "fp32", GPU only): bf16 halves
        the cache's memory and bytes read per token; fp32 follows the reference model's math exactly.
        lm_head: None uses the head the file has; "int8" uses the int8 head (head_int8.py; quantized here when
        the file has none), halving the head's bytes per token; "bf16" uses the float head as stored.
        decode_kernel (GPU): "multi" (the decode step as a chain of kernels), "persistent" (its layers as one
        persistent kernel, bit-identical; bench/NOTES-persistent.md has where each is faster) or "auto"
        (persistent where the shape supports it)."""
        if path is None:
            if not BUILTIN_MODEL.is_file():
                raise FileNotFoundError(
                    f"the built-in model {BUILTIN_MODEL} is not installed; pass the path of an engine file "
                    f"(make one with `qsparse convert`)")
            path = BUILTIN_MODEL
        requested, device = device, _pick_device(device)
        from .model.head_int8 import with_lm_head

        ef = with_lm_head(read_engine(path), lm_head)
        engine = cls(ef, device, _resolve_sparsity(sparsity, ef.sparsity), kv_cache, decode_kernel)
        engine.auto_cpu_fallback = requested == "auto" and device == "cpu"  # already warned about
        return engine

    @property
    def model(self) -> torch.nn.Module:
        """The reference Transformer on the CPU (built on first use: on "cuda" it is only needed for checks)."""
        if self._model is None:
            self._model = build_reference(self.file, self.sparsity)
        return self._model

    # -- forward --------------------------------------------------------------------------------

    def check_ids(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Validate token ids (1-D integers within the vocabulary, at most max_seq_len) -> int64 CPU tensor."""
        ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.as_tensor(list(token_ids))
        if ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError("token_ids is empty")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"token_ids must be integers, got {ids.dtype}")
        ids = ids.to(device="cpu", dtype=torch.int64)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if ids.numel() > self.config.max_seq_len:
            raise ValueError(f"{ids.numel()} tokens exceed the model's context of {self.config.max_seq_len}")
        return ids

    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Full-sequence forward: fp32 logits [len, vocab] (on the engine's device)."""
        ids = self.check_ids(token_ids)
        if self.gpu is not None:
            return self.gpu.logits(ids)
        with torch.no_grad():
            return self.model(ids)

    # -- text generation (generation.py) ---------------------------------------------------------

    def generate(self, prompt: str | Sequence[int] | list, max_new_tokens: int = 256, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, max_batch: int | None = None) -> str | list[str]:
        """The text generated after `prompt` (a str or a list of token ids), the prompt excluded. Stops at an
        end-of-sequence token, at the first `stop` string (left out), after max_new_tokens or at the end of the
        context; temperature 0 is greedy, top_k 0 / top_p 1 are off, a seed makes the result reproducible.

        A list of prompts (each a str or a token-id list) returns the list of their texts, decoded together,
        `max_batch` at a time (default 8 on the CPU, 64 on the GPU), by the serving scheduler; each text
        equals what that prompt gives alone with the same arguments."""
        kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, seed=seed, stop=stop)
        if _is_prompt_batch(prompt):
            from .serving.batch import generate_batch

            return generate_batch(self, list(prompt), max_batch=max_batch, **kw)
        return generation.generate(self, prompt, **kw)

    def stream(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None) -> Iterator[str]:
        """Like generate(), but yield the text in pieces as it is produced; the pieces join to generate()'s
        text for the same arguments and seed."""
        return generation.stream(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                                 stop=stop)

    def chat(self, messages: list[dict[str, Any]], max_new_tokens: int = 256, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop: str | Sequence[str] | None = None) -> str:
        """Reply to a conversation, e.g. [{"role": "user", "content": "Hello"}], through the tokenizer's chat
        template; returns the assistant's text. The sampling arguments are generate()'s."""
        return generation.chat(self, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                               stop=stop)

    def __repr__(self) -> str:
        c = self.config
        return (f"Engine(device={self.device!r}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"vocab={c.vocab_size}, sparsity=({self.sparsity.describe()}))")


def _is_prompt_batch(prompt: Any) -> bool:
    """A list/tuple of str or of token-id sequences (a flat list of ints is one prompt of token ids)."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, (str, list, tuple, torch.Tensor)) for p in prompt))


def _pick_device(device: str) -> str:
    from .kernels import _ext

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "auto":
        if _ext.gpu_available():
            return "cuda"
        what = ("this installation has no CUDA extension (built without nvcc)" if _ext.built_without_cuda()
                else "no CUDA GPU (or no compiled extension) available")
        warnings.warn(f"{what}: running the CPU reference model, which is slow", stacklevel=3)
        return "cpu"
    if device == "cuda":
        _ext.require_gpu()  # raises RuntimeError naming what is missing
    return device
