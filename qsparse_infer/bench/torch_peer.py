"""The PyTorch bf16 peer for `qsparse bench`: the same architecture with dense bf16 weights, written the
gpt-fast way (fused qkv and gate/up matmuls, static KV cache updated with index_copy_, SDPA with a
causal mask over the static cache, greedy argmax on the device), the decode step compiled with
torch.compile and captured in one CUDA graph that also feeds the token and position back, so replays
run back to back like ours. Random weights, generated on the GPU.

batch = B > 1 is the static-batch peer of the serving benchmark (bench_torch_batched): B sequences of the
same length decoded in lockstep (one [B, 1] token tensor per step, caches [L, B, nkv, max_len, hd]).
"""
from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F

from ..model.config import ModelConfig
from ..model.reference import rope_cos_sin


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


class TorchPeer:
    def __init__(self, cfg: ModelConfig, max_len: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0, batch: int = 1) -> None:
        self.cfg, self.max_len, self.dtype, self.batch = cfg, max_len, dtype, batch
        dev = torch.device(device)
        g = torch.Generator(device=dev)
        g.manual_seed(seed)
        h, m = cfg.hidden_size, cfg.intermediate_size

        def w(*shape, std=None):
            std = std if std is not None else shape[-1] ** -0.5
            return (torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * std).to(dtype)

        def ones(n):
            return torch.ones(n, device=dev, dtype=dtype)

        self.embed = w(cfg.vocab_size, h, std=1.0)
        self.head = self.embed if cfg.tie_word_embeddings else w(cfg.vocab_size, h)
        self.norm = ones(h)
        self.layers = []
        for _ in range(cfg.num_layers):
            self.layers.append(dict(
                in_norm=ones(h), post_norm=ones(h),
                wqkv=w(cfg.q_size + 2 * cfg.kv_size, h), wo=w(h, cfg.q_size),
                w13=w(2 * m, h), w2=w(h, m),
                attn_sub=ones(cfg.q_size) if cfg.attn_sub_norm else None,
                ffn_sub=ones(m) if cfg.ffn_sub_norm else None))
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k_cache = torch.zeros(shape, device=dev, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=dev, dtype=dtype)
        cos, sin = rope_cos_sin(torch.arange(max_len), cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.cos, self.sin = cos.to(dev, dtype), sin.to(dev, dtype)
        self.mask = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=dev))
        self.weight_bytes = sum(t.numel() * t.element_size() for L in self.layers for t in L.values()
                                if t is not None) + self.embed.numel() * 2 + (
            0 if cfg.tie_word_embeddings else self.head.numel() * 2)
        self.device = dev
        self.graph: torch.cuda.CUDAGraph | None = None
        self.mode = "eager"

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c, s = self.cos[pos][None, :, None, :], self.sin[pos][None, :, None, :]
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * c + rot * s

    def forward(self, idx: torch.Tensor, pos: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """idx int64 [B, T] (or [T] when batch == 1), pos int64 [T] (shared by the batch) -> logits [B, T, V]
        (or [T, V]); bf16 matmuls, fp32 norms. last_only: logits of the last position only (T' = 1)."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        single = idx.dim() == 1
        if single:
            idx = idx[None]
        b, t = idx.shape
        nq, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = self.embed[idx]
        mask = self.mask[pos]  # [T, max_len]
        for i, L in enumerate(self.layers):
            hqkv = F.linear(_rms(x, L["in_norm"], eps), L["wqkv"])
            q, k, v = hqkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            q = self._rope(q.view(b, t, nq, hd), pos)
            k = self._rope(k.view(b, t, nkv, hd), pos)
            self.k_cache[i].index_copy_(2, pos, k.transpose(1, 2))
            self.v_cache[i].index_copy_(2, pos, v.view(b, t, nkv, hd).transpose(1, 2))
            y = F.scaled_dot_product_attention(q.transpose(1, 2), self.k_cache[i], self.v_cache[i],
                                               attn_mask=mask[None, None], enable_gqa=True)
            y = y.transpose(1, 2).reshape(b, t, cfg.q_size)
            if L["attn_sub"] is not None:
                y = _rms(y, L["attn_sub"], eps)
            x = x + F.linear(y, L["wo"])
            gu = F.linear(_rms(x, L["post_norm"], eps), L["w13"])
            gate, up = gu.chunk(2, dim=-1)
            a = F.relu(gate).square() * up if cfg.activation == "relu2" else F.silu(gate) * up
            if L["ffn_sub"] is not None:
                a = _rms(a, L["ffn_sub"], eps)
            x = x + F.linear(a, L["w2"])
        if last_only:
            x = x[:, -1:]
        logits = F.linear(_rms(x, self.norm, eps), self.head).float()
        return logits[0] if single else logits

    def _step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tok [B, 1] -> the next tokens [B, 1] (greedy)."""
        return torch.argmax(self.forward(tok, pos)[:, -1], dim=-1, keepdim=True)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> int | list[int]:
        """ids [T] (-> first token) or [B, T] (-> first token per sequence)."""
        pos = torch.arange(ids.shape[-1], device=self.device)
        # a batch computes the head for the last position only ([B, T, V] fp32 logits would dominate memory)
        first = torch.argmax(self.forward(ids.to(self.device), pos, last_only=ids.dim() == 2)[..., -1, :], dim=-1)
        return int(first) if ids.dim() == 1 else first.tolist()

    @torch.no_grad()
    def capture(self, compile: bool = True) -> str:
        """Compile the decode step (if asked and possible) and capture it, with the token/position feedback,
        in one CUDA graph. Returns the mode used."""
        self.tok = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        fn, mode = self._step, "eager+cudagraph"
        if compile:
            try:
                fn = torch.compile(self._step, fullgraph=True, dynamic=False)
                mode = "torch.compile+cudagraph"
            except Exception:  # pragma: no cover (compile unavailable)
                fn = self._step

        def body():
            nxt = fn(self.tok, self.pos)
            self.tok.copy_(nxt)
            self.pos.add_(1)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(3):
                    body()
        except Exception:
            if fn is self._step:
                raise
            fn, mode = self._step, "eager+cudagraph (torch.compile failed)"
            with torch.cuda.stream(side):
                for _ in range(3):
                    body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                body()
        except Exception:
            if fn is self._step:
                raise
            torch.cuda.synchronize(self.device)
            fn, mode = self._step, "eager+cudagraph (capturing the compiled step failed)"
            with torch.cuda.stream(side):
                body()
            torch.cuda.synchronize(self.device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                body()
        torch.cuda.synchronize(self.device)
        self.mode = mode
        return mode

    def start_decode(self, first_token: int | list[int], position: int) -> None:
        if isinstance(first_token, int):
            self.tok.fill_(first_token)
        else:
            self.tok.copy_(torch.tensor(first_token, dtype=torch.long).view(-1, 1))
        self.pos.fill_(position)

    def step(self) -> None:
        self.graph.replay()


@torch.no_grad()
def bench_torch_batched(cfg: ModelConfig, B: int, prompt_len: int = 128, new_tokens: int = 128,
                        compile: bool = True, device: str = "cuda") -> dict[str, Any]:
    """Static batch of B sequences (random prompts of prompt_len tokens), greedy decode of new_tokens steps
    with the compiled step in a CUDA graph. tok_s counts every sequence's tokens (B per step)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    peer = TorchPeer(cfg, max_len=prompt_len + new_tokens + 8, device=device, batch=B)
    mode = peer.capture(compile=compile)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=g)
    first = peer.prefill(prompts)
    peer.start_decode(first, prompt_len)
    for _ in range(3):  # warm replays
        peer.step()
    peer.start_decode(first, prompt_len)
    torch.cuda.synchronize(device)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(new_tokens + 1)]
    ev[0].record()
    for i in range(new_tokens):
        peer.step()
        ev[i + 1].record()
    torch.cuda.synchronize(device)
    step_ms = [ev[i].elapsed_time(ev[i + 1]) for i in range(new_tokens)]
    ms = statistics.median(step_ms)
    out = {"B": B, "mode": mode, "ms_per_step": ms, "tok_s": B * 1e3 / ms,
           "peak_mem": torch.cuda.max_memory_allocated(device)}
    del peer
    torch.cuda.empty_cache()
    return out
