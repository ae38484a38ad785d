"""The training tool: straight-through estimators, equality with the reference math, a short CPU
training run, checkpoints and resume. All CPU and fast (a few seconds each)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qsparse_infer.cli import main as cli
from qsparse_infer.model import quant
from qsparse_infer.model.config import ModelConfig, SparsityConfig
from qsparse_infer.model.reference import TernaryLinear, Transformer
from qsparse_infer.train import trainer as tr
from qsparse_infer.train import data as td

# ---------------------------------------------------------------------------------------------
# STE and the sparsity function
# ---------------------------------------------------------------------------------------------


def test_sparsify_ste_forward_is_topk_and_gradient_reaches_unselected_inputs():
    torch.manual_seed(0)
    x = torch.randn(5, 37, requires_grad=True)
    k = 11
    y = tr.sparsify_ste(x, k)
    mask = quant.topk_mask(x.detach(), k)
    assert torch.equal(y.detach(), torch.where(mask, x.detach(), torch.zeros(())))
    assert int((y.detach() != 0).sum()) == 5 * k
    upstream = torch.randn(5, 37)
    (y * upstream).sum().backward()
    # Q-Sparse's STE: the mask is the identity in the backward pass, for every input channel.
    assert torch.equal(x.grad, upstream)
    assert (x.grad[~mask] != 0).all()


def test_topk_keep_mask_matches_reference_tie_rule():
    torch.manual_seed(1)
    x = torch.randint(-3, 4, (64, 29)).float()  # many ties in |x|
    for k in (0, 1, 7, 15, 28, 29):
        assert torch.equal(tr.topk_keep_mask(x, k), quant.topk_mask(x, k)), k
    with pytest.raises(ValueError, match="out of range"):
        tr.topk_keep_mask(x, 30)


@pytest.mark.parametrize("shape,n,k", [((7, 64), 48, 25), ((3, 5, 37), 19, 37), ((1, 130), 77, 1), ((9, 33), 16, 20)])
def test_qsparse_linear_forward_equals_reference_bitlinear(shape, n, k):
    torch.manual_seed(sum(shape) + n + k)
    lin = tr.QSparseLinear(shape[-1], n)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) * 3)  # uneven spread, so T has all three values
    lin.k = k
    x = torch.randn(shape) * torch.rand(shape[-1]) * 4
    t, beta = quant.ternarize_absmean(lin.weight.detach())
    assert set(t.unique().tolist()) == {-1, 0, 1}
    ref = quant.bitlinear(x, t, beta, k)
    out = lin(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_qsparse_linear_gradients_follow_the_ste():
    torch.manual_seed(3)
    lin = tr.QSparseLinear(40, 24)
    lin.k = 10
    x = torch.randn(6, 40, requires_grad=True)
    g = torch.randn(6, 24)
    (lin(x) * g).sum().backward()
    t, beta = quant.ternarize_absmean(lin.weight.detach())
    # dy/dx = beta * T (through the quantizer and the mask), so the masked channels get gradient too.
    torch.testing.assert_close(x.grad, g @ (t.float() * beta), rtol=1e-5, atol=1e-6)
    assert (x.grad[~quant.topk_mask(x.detach(), 10)] != 0).any()
    # dy/dW = g^T x_q, with x_q the dequantized, sparsified input.
    q, gamma = quant.quantize_sparse_int8(x.detach(), 10)
    torch.testing.assert_close(lin.weight.grad, g.t() @ (q.float() * gamma / 127), rtol=1e-4, atol=1e-6)


def test_full_precision_variant_is_a_masked_linear():
    torch.manual_seed(4)
    lin = tr.QSparseLinear(32, 8, ternary=False, int8=False)
    lin.k = 12
    x = torch.randn(4, 32)
    ref = (x * quant.topk_mask(x, 12)) @ lin.weight.detach().t()
    torch.testing.assert_close(lin(x), ref)


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, max_seq_len=64, tie_word_embeddings=True)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("tied", [True, False])
def test_training_model_equals_reference_transformer(tied):
    """The trained architecture is the reference one: load its ternarized weights into the inference
    Transformer (TernaryLinear) and the logits agree; the vmapped batch equals per-sequence calls."""
    torch.manual_seed(5)
    cfg = tiny_config(tie_word_embeddings=tied)
    sp = SparsityConfig(attn=0.5, o=0.25, mlp=0.6, down=0.4)
    model = tr.build_model(cfg, sp)
    ref = Transformer(cfg, sp)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".weight") or "norm" in k}
    ref.load_state_dict(state, strict=False)
    for (_, _, lin), (_, _, tl) in zip(model.projections(), ref.projections()):
        assert isinstance(tl, TernaryLinear) and lin.k == tl.k
        t, beta = quant.ternarize_absmean(lin.weight.detach())
        tl.ternary.copy_(t)
        tl.beta.copy_(beta)
    ids = torch.randint(0, cfg.vocab_size, (3, 17))
    with torch.no_grad():
        batched = tr.batched_logits(model, ids)
        for b in range(3):
            want = ref(ids[b])
            torch.testing.assert_close(batched[b], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Data and tokenizer
# ---------------------------------------------------------------------------------------------

LINES = [
    "KING. What say you, lords, to this our royal will?",
    "QUEEN. My gracious lord, the heavens smile on thee;",
    "  And all the court doth wait upon thy word.",
    "FOOL. Nuncle, the rain it raineth every day!",
    "[Exit.]",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small stand-in for the Shakespeare folder: five 'works' and a metadata.txt."""
    root = tmp_path_factory.mktemp("corpus")
    meta = []
    for i in range(5):
        name = f"work{i}_gut"
        rng = torch.Generator().manual_seed(i)
        order = torch.randint(0, len(LINES), (400,), generator=rng).tolist()
        text = f"THE PLAY NUMBER {i}\n\n" + "\n".join(LINES[j] for j in order) + "\n"
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
        meta.append(f"[{name}]\ntitle = Play {i}\n")
    (root / "metadata.txt").write_text("\n".join(meta))
    return root


def test_works_split_and_titles(corpus):
    works = td.load_works(corpus)
    assert [w.name for w in works] == [f"work{i}_gut" for i in range(5)]
    train, val = td.split_works(works, ["work1_gut", "work3_gut"])
    assert [w.title for w in val] == ["Play 1", "Play 3"]
    assert len(train) == 3 and all(w.name not in ("work1_gut", "work3_gut") for w in train)
    with pytest.raises(ValueError, match="not in the corpus"):
        td.split_works(works, ["hamlet_gut"])
    with pytest.raises(FileNotFoundError, match="corpus folder not found"):
        td.load_works(corpus / "missing")


def test_tokenizer_is_deterministic_and_lossless(corpus):
    works = td.load_works(corpus)
    a = td.train_tokenizer(works, 320)
    b = td.train_tokenizer(works, 320)
    assert a == b
    sp = td.load_tokenizer(a)
    assert sp.get_piece_size() == 320
    text = "KING. Nuncle!\n\n  And all the court — naïve ß ☃\n"  # unseen characters go through byte fallback
    assert sp.decode(sp.encode(text)) == text
    assert sp.piece_to_id("\n") != sp.unk_id()


def test_token_windows_start_with_bos_and_shift_by_one():
    tokens = torch.arange(10, 110, dtype=torch.int32)
    stream = td.TokenStream(tokens, 8, bos_id=1)
    x, y = stream.sample(16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 8) and (x[:, 0] == 1).all()
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, 1:] - y[:, :-1], torch.ones(16, 7, dtype=torch.long))
    assert int(y.min()) >= 10 and int(y.max()) <= 109
    vx, vy = stream.windows()
    assert vx.shape == (12, 8) and torch.equal(vy.reshape(-1), tokens[:96].long())  # every target exactly once
    assert (vx[:, 0] == 1).all() and torch.equal(vx[:, 1:], vy[:, :-1])
    plain = td.TokenStream(tokens, 8, bos_id=None)  # --window-bos doc: plain slices of the stream
    x, y = plain.sample(16, torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, 0], x[:, 0] + 1) and int(y.max()) <= 109
    vx, vy = plain.windows()
    assert vx.shape == (12, 8) and torch.equal(vx.reshape(-1), tokens[:96].long())


# ---------------------------------------------------------------------------------------------
# Training runs (CLI), checkpoints, resume
# ---------------------------------------------------------------------------------------------

TINY_ARGS = ["--val-works", "work4_gut", "--vocab-size", "320", "--hidden", "32", "--intermediate", "64",
             "--layers", "2", "--heads", "2", "--kv-heads", "1", "--seq-len", "32", "--batch-size", "8",
             "--lr", "1e-2", "--warmup", "5", "--device", "cpu", "--log-every", "5", "--save-every", "0",
             "--sparsity", "0.5"]


def run_train(corpus: Path, out: Path, *extra: str) -> dict:
    rc = cli.main(["train", "--data", str(corpus), "--out", str(out), *TINY_ARGS, *extra])
    assert rc == 0
    return json.loads((out / "curves.json").read_text())


def test_training_reduces_loss_and_checkpoint_round_trips(corpus, tmp_path):
    out = tmp_path / "run"
    curves = run_train(corpus, out, "--steps", "40", "--eval-every", "20")
    train_losses = [row[2] for row in curves["train"]]
    val_losses = [row[2] for row in curves["val"]]
    assert train_losses[-1] < train_losses[0] - 1.0, train_losses
    assert val_losses[-1] < 5.0 < torch.log(torch.tensor(320.0)).item(), val_losses  # well below uniform

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["QSparseForCausalLM"]
    cfg = ModelConfig.from_dict(config["qsparse"]["model"])
    assert SparsityConfig.from_dict(config["qsparse"]["sparsity"]) == SparsityConfig.uniform(0.5)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.tie_word_embeddings) == (320, 32, 2, True)
    assert (cfg.activation, cfg.attn_sub_norm, cfg.ffn_sub_norm) == ("relu2", True, True)

    from safetensors.torch import load_file
    tensors = load_file(str(out / "model.safetensors"))
    assert {"embed", "norm.weight", "layers.0.attn.q.weight", "layers.1.mlp.down.weight",
            "layers.0.attn.sub_norm.weight", "layers.0.mlp.sub_norm.weight"} <= set(tensors)
    assert "lm_head" not in tensors and all(t.dtype == torch.float32 for t in tensors.values())

    model, tok = tr.load_model_folder(out)
    assert tok == (out / "tokenizer.model").read_bytes()
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    for name, t in model.state_dict().items():
        assert torch.equal(t, state["model"][name]), name
    ids = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(tr.batched_logits(model, ids)).all()


def test_resume_continues_exactly(corpus, tmp_path):
    straight = tmp_path / "straight"
    run_train(corpus, straight, "--steps", "20", "--eval-every", "10")
    split = tmp_path / "split"
    run_train(corpus, split, "--steps", "20", "--eval-every", "10", "--stop-at-step", "10")
    assert torch.load(split / "trainer_state.pt", weights_only=False)["step"] == 10
    curves = run_train(corpus, split, "--steps", "20", "--eval-every", "10", "--resume")
    assert curves["train"][-1][0] == 20
    a = torch.load(straight / "trainer_state.pt", weights_only=False)["model"]
    b = torch.load(split / "trainer_state.pt", weights_only=False)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_rejects_a_different_model(corpus, tmp_path):
    out = tmp_path / "run"
    run_train(corpus, out, "--steps", "5", "--eval-every", "5")
    with pytest.raises(ValueError, match="--hidden"):
        tr.train(cli.build_parser(["train"])[0].parse_args(
            ["train", "--data", str(corpus), "--out", str(out), *TINY_ARGS, "--steps", "10", "--resume",
             "--hidden", "64"]))


def test_bad_arguments_are_named(corpus, tmp_path):
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "x"), *TINY_ARGS, "--steps", "0"]) == 1
    assert cli.main(["train", "--data", str(corpus / "nope"), "--out", str(tmp_path / "y"), *TINY_ARGS]) == 1
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "z"), "--resume", *TINY_ARGS]) == 1
    run_train(corpus, tmp_path / "w", "--steps", "2", "--eval-every", "2")
    before = (tmp_path / "w" / "trainer_state.pt").read_bytes()
    # a second run into the same folder without --resume must not overwrite the first one
    assert cli.main(["train", "--data", str(corpus), "--out", str(tmp_path / "w"), *TINY_ARGS, "--steps", "3"]) == 1
    assert (tmp_path / "w" / "trainer_state.pt").read_bytes() == before


def test_checkpoint_converts_and_the_engine_matches_the_training_model(corpus, tmp_path):
    import qsparse_infer
    from qsparse_infer import Engine

    out = tmp_path / "run"
    run_train(corpus, out, "--steps", "10", "--eval-every", "10", "--sparsity", "0.5,0.25,0.6,0.4")
    dst = qsparse_infer.convert(out, tmp_path / "m.qsp", progress=False)
    engine = Engine.load(dst, device="cpu")
    model, _ = tr.load_model_folder(out)
    assert engine.config == model.cfg and engine.sparsity == SparsityConfig(attn=0.5, o=0.25, mlp=0.6, down=0.4)
    ids = engine.tokenizer.encode("KING. What say you, lords?")
    assert ids[0] == engine.tokenizer.bos_id
    with torch.no_grad():
        want = model(torch.tensor(ids))
    got = engine.logits(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ---------------------------------------------------------------------------------------------
# The built-in model (qsparse_infer/data/shakespeare.qsp)
# ---------------------------------------------------------------------------------------------

# Greedy continuation of "ROMEO:" (BOS + prompt), 32 new tokens, on the CPU reference path as generation
# runs it: the prompt in one forward, then one token at a time through the reference KV cache.
GOLDEN_PROMPT = "ROMEO:"
GOLDEN_PROMPT_IDS = [1, 1110, 4053, 4040, 4044, 4058]
GOLDEN_IDS = [3, 4051, 1339, 934, 271, 889, 299, 351, 396, 763, 522, 4022, 4027, 3, 4037, 270, 347, 765, 4042, 4024,
              296, 271, 1796, 4030, 3, 3, 4064, 552, 325, 1155, 297, 1163]
GOLDEN_TEXT = "\nHere comes the way of Philippi,\nAnd weigh'd to the field.\n\n[Enter HERO and LE"
# Top-1 minus top-2 logit at each step. Steps 8 and 22 are near-ties (< 0.01). Beyond logit near-ties, a
# quantized model has a second source of legitimate divergence: one activation that lands within float
# rounding of an int8 rounding boundary (or of the top-K threshold) flips by one step, and the change
# grows through the later layers. Here the full-sequence forward (engine.logits over the whole text)
# differs from the KV-cache path by ~1e-6 in layer 1's o_proj input, one int8 value flips, and at step
# 29 the full-sequence greedy picks 1979 ("Hotspur") instead of 1155 ("HERO"). A GPU path can diverge
# the same way; compare it token by token and check such flips before calling a difference a bug.
GOLDEN_MARGINS = [1.644, 0.046, 1.324, 0.084, 1.486, 0.46, 0.232, 0.316, 0.003, 3.507, 3.455, 1.036, 0.131, 0.146,
                  0.699, 1.238, 0.171, 0.257, 0.053, 2.926, 0.416, 1.667, 0.005, 0.347, 3.697, 5.357, 1.48, 1.366,
                  0.156, 0.088, 1.834, 0.774]


def test_builtin_model_is_packaged_and_small():
    from qsparse_infer.engine import BUILTIN_MODEL
    from qsparse_infer import Engine

    assert BUILTIN_MODEL.is_file(), f"{BUILTIN_MODEL} missing: is it in the wheel?"
    assert BUILTIN_MODEL.stat().st_size < 8 * 2**20
    engine = Engine.load(device="cpu")
    c = engine.config
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.max_seq_len) == \
        (4096, 384, 6, 6, 2, 512)
    assert engine.sparsity == SparsityConfig.uniform(0.6)
    assert engine.tokenizer.encode(GOLDEN_PROMPT) == GOLDEN_PROMPT_IDS


# The documented near-tie rule. Greedy decoding is a chain of argmaxes over logits that pass through
# int8 rounding and top-K selection; another fp32 summation order can flip one int8 value or one top-K
# choice and move the logits. So a run matches the golden ids exactly, or its first difference falls on
# a step where the stored top-2 logit margin is below the path's NEAR_TIE; every token before that step
# must match. The CPU path differs only by the matmul kernels' summation order (another CPU: seen on
# the GPU machine's CPU, diverging at a 0.005 margin). The GPU path also sums the RMSNorms in another
# order and fuses them into the selection; its decode-step logits differ from the reference by up to
# ~4e-3 relative (tests/gpu/test_gpu_model_gpu.py), about 0.05-0.1 absolute on this model's logits. On an
# H100 it diverged at step 1, where the reference margin is 0.046 (bench/results/gpu-tests-h100.log).
# On the CI machine, which made the golden data, the CPU run matches exactly.
NEAR_TIE = {"cpu": 0.02, "cuda": 0.1}


def assert_matches_golden(new: list[int], device: str = "cpu") -> None:
    first = next((i for i, (a, b) in enumerate(zip(new, GOLDEN_IDS)) if a != b), None)
    if first is None:
        assert len(new) == len(GOLDEN_IDS), (new, GOLDEN_IDS)
        return
    assert GOLDEN_MARGINS[first] < NEAR_TIE[device], (
        f"greedy tokens diverge from the golden ids at step {first} ({new[first]} vs {GOLDEN_IDS[first]}), "
        f"where the reference's top-2 margin is {GOLDEN_MARGINS[first]} (not a near-tie)")


def test_builtin_model_golden_greedy_generation_cpu():
    from qsparse_infer import Engine
    from qsparse_infer.model.reference import KVCache

    engine = Engine.load(device="cpu")
    ids = engine.tokenizer.encode(GOLDEN_PROMPT)
    model = engine.model
    new: list[int] = []
    margins = []
    with torch.no_grad():
        cache = KVCache.empty(engine.config, len(ids) + 32)
        logits = model(torch.tensor(ids), cache, 0)[-1]
        for step in range(32):
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            new.append(int(logits.argmax()))
            if step < 31:
                logits = model(torch.tensor(new[-1:]), cache, len(ids) + step)[-1]
    assert_matches_golden(new)
    if new == GOLDEN_IDS:
        assert engine.tokenizer.decode(new) == GOLDEN_TEXT
        assert margins == pytest.approx(GOLDEN_MARGINS, abs=1e-2)
        assert engine.generate(GOLDEN_PROMPT, max_new_tokens=32, temperature=0) == GOLDEN_TEXT


@pytest.mark.gpu
def test_builtin_model_golden_greedy_generation_gpu():
    from qsparse_infer import Engine
    from qsparse_infer.generate.generation import generate_tokens

    engine = Engine.load(device="cuda", kv_cache="fp32")  # the reference keeps K/V in fp32
    new = list(generate_tokens(engine, GOLDEN_PROMPT, max_new_tokens=32, temperature=0, stop_at_eos=False))
    assert_matches_golden(new, "cuda")
    if new == GOLDEN_IDS:
        assert engine.generate(GOLDEN_PROMPT, max_new_tokens=32, temperature=0) == GOLDEN_TEXT
