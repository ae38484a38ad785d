"""Small models, checkpoints and tokenizers made inside the tests (nothing is downloaded)."""
from __future__ import annotations

import functools
import io
import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

from qsparse_infer.model.config import ModelConfig, SparsityConfig
from qsparse_infer.model.format import GROUPS, group_geometry
from qsparse_infer.packing import pack_ternary
from qsparse_infer.model.reference import Transformer

WORDS = ("the king queen castle river night day sword crown love war peace bread wine horse field storm sea "
         "ship gold silver stone fire water earth wind song heart mind hand eye").split()


def sample_text(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.2:
            words.append(rng.choice(["café", "naïve", "über", "señor", "日本", "☃"]))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
    return lines


@functools.cache
def sentencepiece_model(vocab_size: int = 360) -> bytes:
    """A tiny sentencepiece BPE model with byte fallback (so any UTF-8 text round-trips)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_text()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.995, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
    return buf.getvalue()


@functools.cache
def hf_tokenizer_json(vocab_size: int = 300) -> bytes:
    """A tiny byte-level BPE tokenizer.json with <s>, </s>, <pad> and chat markers as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sample_text(), trainer=trainer)
    return tok.to_str().encode()


VOCAB = 400  # >= the test tokenizers' vocabularies (300 and 360)

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                 "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, max_seq_len=64, rope_theta=10000.0, activation="relu2")
    base.update(kw)
    return ModelConfig(**base)


def random_reference(cfg: ModelConfig, seed: int = 0, sparsity: SparsityConfig | None = None) -> Transformer:
    """A reference model with random ternary weights, betas, norms and embeddings."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg, sparsity)
    with torch.no_grad():
        for p_name, p in model.named_parameters():
            if p_name.endswith("weight"):  # norms
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # embed / lm_head
                p.copy_(torch.randn(p.shape, generator=g))
        for _, _, lin in model.projections():
            lin.ternary.copy_(torch.randint(-1, 2, lin.ternary.shape, generator=g, dtype=torch.int8))
            lin.beta.fill_(0.5 + torch.rand((), generator=g).item())
    return model.eval()


def engine_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The engine-file tensors of a reference model (the inverse of format.build_reference)."""
    cfg = model.cfg
    out = {"embed_tokens": model.embed.detach().clone(), "norm": model.norm.weight.detach().clone()}
    if model.lm_head is not None:
        out["lm_head"] = model.lm_head.detach().clone()
    for i, b in enumerate(model.layers):
        p = f"layers.{i}."
        out[p + "input_norm"] = b.input_norm.weight.detach().clone()
        out[p + "post_attn_norm"] = b.post_attn_norm.weight.detach().clone()
        if b.attn.sub_norm is not None:
            out[p + "attn_sub_norm"] = b.attn.sub_norm.weight.detach().clone()
        if b.mlp.sub_norm is not None:
            out[p + "ffn_sub_norm"] = b.mlp.sub_norm.weight.detach().clone()
        mods = {"q": b.attn.q, "k": b.attn.k, "v": b.attn.v, "o": b.attn.o,
                "gate": b.mlp.gate, "up": b.mlp.up, "down": b.mlp.down}
        for group, (members, layout) in GROUPS.items():
            assert [mods[m].out_features for m in members] == group_geometry(cfg, group)[1]
            out[p + group + ".packed"] = pack_ternary([mods[m].ternary for m in members], layout)
            out[p + group + ".scales"] = torch.tensor([float(mods[m].beta) for m in members], dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints made with transformers
# ---------------------------------------------------------------------------------------------


def latent(shape, g: torch.Generator) -> torch.Tensor:
    """Trained-like latent weights: heavy-tailed, so absmean ternarization gives a healthy mix of -1/0/1."""
    return torch.randn(shape, generator=g) * torch.exp(0.5 * torch.randn(shape, generator=g))


def write_config(folder: Path, d: dict) -> None:
    (folder / "config.json").write_text(json.dumps(d, indent=1))


def make_bitnet_folder(folder: Path, *, linear_class: str = "bitlinear", mode: str = "offline",
                       act: str = "relu2", tied: bool = False, kv_heads: int = 2, seed: int = 0,
                       latent_dtype: torch.dtype = torch.float32, tokenizer: bool = False,
                       extra_config: dict | None = None) -> Path:
    """Write a small random transformers BitNetForCausalLM checkpoint.

    offline: ternarize the latent weights ourselves and store them in transformers' packed uint8 layout
    (packed with transformers' own `pack_weights`) with `weight_scale` as linear_class defines it;
    online: store the latent weights and let transformers quantize them at run time."""
    from transformers import BitNetConfig
    from transformers.integrations.bitnet import pack_weights

    folder.mkdir(parents=True, exist_ok=True)
    cfg = BitNetConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, hidden_act=act,
                       max_position_embeddings=64, tie_word_embeddings=tied, rope_theta=10000.0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=None)
    g = torch.Generator().manual_seed(seed)
    h, m, hd = 64, 96, 16
    shapes = {"q_proj": (4 * hd, h), "k_proj": (kv_heads * hd, h), "v_proj": (kv_heads * hd, h),
              "o_proj": (h, 4 * hd), "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(VOCAB, h, generator=g),
                                   "model.norm.weight": 1 + 0.2 * torch.randn(h, generator=g)}
    if not tied:
        sd["lm_head.weight"] = torch.randn(VOCAB, h, generator=g)
    for i in range(2):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.2 * torch.randn(h, generator=g)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.2 * torch.randn(h, generator=g)
        sd[p + "self_attn.attn_sub_norm.weight"] = 1 + 0.2 * torch.randn(h, generator=g)
        sd[p + "mlp.ffn_sub_norm.weight"] = 1 + 0.2 * torch.randn(m, generator=g)
        for proj, shape in shapes.items():
            name = p + ("self_attn." if proj[0] in "qkvo" else "mlp.") + proj + ".weight"
            w = latent(shape, g).to(latent_dtype)
            if mode == "online":
                sd[name] = w
                continue
            wf = w.float()
            beta = wf.abs().mean().clamp(min=1e-5)
            t = torch.round(wf * (1.0 / beta)).clamp(-1, 1)
            sd[name] = pack_weights(t.to(torch.int8).clone())
            scale = beta if linear_class == "autobitlinear" else 1.0 / beta
            sd[name[: -len("weight")] + "weight_scale"] = scale.reshape(1).float()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    d = cfg.to_dict()
    d["architectures"] = ["BitNetForCausalLM"]
    d["quantization_config"] = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": mode}
    d.update(extra_config or {})
    write_config(folder, d)
    if tokenizer:
        (folder / "tokenizer.json").write_text(hf_tokenizer_json().decode())
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>",
             "chat_template": CHAT_TEMPLATE}))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    return folder


def hf_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """transformers' own logits for the checkpoint in `folder` (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def make_qsparse_folder(folder: Path, cfg: ModelConfig, sparsity: SparsityConfig | None = None,
                        seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint in the training tool's layout: reference.Transformer state_dict names with latent fp32
    `.weight` projections, config.json {"architectures": ["QSparseForCausalLM"], "qsparse": {...}}."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, q, kv, mi = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    sd = {"embed": torch.randn(cfg.vocab_size, h, generator=g), "norm.weight": 1 + 0.2 * torch.randn(h, generator=g)}
    if not cfg.tie_word_embeddings:
        sd["lm_head"] = torch.randn(cfg.vocab_size, h, generator=g)
    shapes = {"attn.q": (q, h), "attn.k": (kv, h), "attn.v": (kv, h), "attn.o": (h, q),
              "mlp.gate": (mi, h), "mlp.up": (mi, h), "mlp.down": (h, mi)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        sd[p + "input_norm.weight"] = 1 + 0.2 * torch.randn(h, generator=g)
        sd[p + "post_attn_norm.weight"] = 1 + 0.2 * torch.randn(h, generator=g)
        if cfg.attn_sub_norm:
            sd[p + "attn.sub_norm.weight"] = 1 + 0.2 * torch.randn(q, generator=g)
        if cfg.ffn_sub_norm:
            sd[p + "mlp.sub_norm.weight"] = 1 + 0.2 * torch.randn(mi, generator=g)
        for name, shape in shapes.items():
            sd[p + name + ".weight"] = latent(shape, g)
    save_file(sd, str(folder / "model.safetensors"))
    write_config(folder, {"architectures": ["QSparseForCausalLM"],
                          "qsparse": {"model": cfg.to_dict(),
                                      "sparsity": (sparsity or SparsityConfig()).to_dict()}})
    (folder / "tokenizer.model").write_bytes(sentencepiece_model())
    return folder, sd


def greedy_tokens_graph_and_eager(gpu, ids, steps: int = 6) -> list[list[int]]:
    """Greedy tokens of a GpuModel (prefill of ids[:5], then `steps` decode steps), once with the decode step in a
    CUDA graph and once eager: the two lists must be equal."""
    from qsparse_infer.generate.sampling import SamplingSettings

    runs = []
    for graph in (True, False):
        gpu.set_graph(graph)
        runs.append([gpu.prefill(ids[:5], SamplingSettings(temperature=0))] + [gpu.step() for _ in range(steps)])
    return runs


# ---------------------------------------------------------------------------------------------
# Full-precision Hugging Face checkpoints (Llama, Mistral, Qwen2) made with transformers
# ---------------------------------------------------------------------------------------------

DENSE_CONFIGS = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                 "Qwen2ForCausalLM": "Qwen2Config"}


def make_dense_folder(folder: Path, arch: str = "LlamaForCausalLM", *, tied: bool = False, kv_heads: int = 2,
                      dtype: torch.dtype = torch.bfloat16, seed: int = 0, shard_size: str | None = "40KB",
                      tokenizer: bool = False, hidden: int = 64, intermediate: int = 96, layers: int = 2,
                      heads: int = 4, vocab: int = VOCAB, extra_config: dict | None = None) -> Path:
    """A small random transformers checkpoint of a full-precision family, saved with save_pretrained (sharded
    when shard_size is given). Weights ~ N(0, 1/in) (a signal that neither vanishes nor explodes over the
    layers), norms 1 + N(0, 0.2), Qwen2's q/k/v biases N(0, 0.1)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
              tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
    kw.update(extra_config or {})
    cfg = getattr(transformers, DENSE_CONFIGS[arch])(**kw)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    model = model.to(dtype)
    model.config.architectures = [arch]
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    if tokenizer:
        (folder / "tokenizer.json").write_text(hf_tokenizer_json().decode())
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}))
    return folder


def hf_dense_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """transformers' fp32 logits for a full-precision checkpoint (its bf16 weights widened exactly)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


# Two small decoder shapes the GPU model tests and the persistent step's tests both run (config, sparsity).
# BitNet-like: ReLU²-GLU, sub-norms, tied embeddings, GQA 4:1, sparse.
GPU_BITNET = (ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=352, num_layers=3, num_heads=8,
                          num_kv_heads=2, head_dim=32, max_seq_len=160, rope_theta=10000.0, activation="relu2",
                          attn_sub_norm=True, ffn_sub_norm=True, tie_word_embeddings=True),
              SparsityConfig(attn=0.5, o=0.4, mlp=0.6, down=0.3))
# Llama-like: SiLU-GLU, no sub-norms, untied head, G = 2, dense.
GPU_LLAMA = (ModelConfig(vocab_size=777, hidden_size=192, intermediate_size=272, num_layers=2, num_heads=6,
                         num_kv_heads=3, head_dim=32, max_seq_len=128, rope_theta=500000.0, activation="silu",
                         attn_sub_norm=False, ffn_sub_norm=False, tie_word_embeddings=False),
             SparsityConfig())
