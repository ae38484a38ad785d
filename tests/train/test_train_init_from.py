"""`qsparse train --init-from`: a full-precision Hugging Face model continue-trained with the STE top-K. The start
model in training equals the engine at the same sparsity, the result is a folder of the same architecture that
transformers loads, and it converts (with its sparsity and re-scale recorded) and runs."""
from __future__ import annotations

import json

import pytest
import torch
from builders import make_dense_folder, sample_text

import qsparse_infer
from qsparse_infer import Engine
from qsparse_infer.cli import main as cli
from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.format import read_metadata
from qsparse_infer.train import hf_init
from qsparse_infer.train import trainer as tr

pytestmark = pytest.mark.filterwarnings("ignore:.*CPU", "ignore:.*has no tokenizer")

IDS = [1, 17, 250, 9, 100, 42, 5, 77, 201, 12]


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("\n".join(sample_text(600, seed=5)) + "\n")
    return path


@pytest.mark.parametrize("arch, spec, rescale", [("LlamaForCausalLM", "0.5", "none"),
                                                 ("Qwen2ForCausalLM", "attn=0.5,gate=0.6,up=0.4", "l2")])
def test_training_model_equals_engine_at_the_start(tmp_path, arch, spec, rescale):
    src = make_dense_folder(tmp_path / "hf", arch, tokenizer=True)
    sparsity = SparsityConfig.parse(spec)
    start = hf_init.read_start(src, rescale)
    model = tr.build_model(start.config, sparsity)
    hf_init.load_weights(model, start)
    with torch.no_grad():
        got = tr.batched_logits(model.eval(), torch.tensor([IDS]))[0]
    engine = Engine.load(qsparse_infer.convert(src, tmp_path / "m.qsp", sparsity=spec, topk_rescale=rescale,
                                               progress=False), device="cpu")
    torch.testing.assert_close(got, engine.logits(IDS), rtol=1e-4, atol=1e-4)


def test_init_from_trains_converts_and_runs(tmp_path, text):
    from transformers import AutoModelForCausalLM

    src = make_dense_folder(tmp_path / "hf", "Qwen2ForCausalLM", tokenizer=True, tied=True)
    out = tmp_path / "ft"
    rc = cli.main(["train", "--init-from", str(src), "--text", str(text), "--sparsity", "0.5", "--steps", "12",
                   "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3", "--warmup", "2", "--device", "cpu",
                   "--eval-every", "6", "--log-every", "4", "--save-every", "0", "--topk-rescale", "l2",
                   "--out", str(out)])
    assert rc == 0
    curves = json.loads((out / "curves.json").read_text())
    assert [row[0] for row in curves["val"]] == [0, 6, 12]  # step 0: the start, training-free at S = 0.5
    assert curves["val"][-1][2] < curves["val"][0][2]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["q_sparse"] == {"sparsity": SparsityConfig.uniform(0.5).to_dict(), "topk_rescale": "l2"}
    assert (out / "tokenizer.json").is_file() and not (out / "model.safetensors.index.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        expected = hf(torch.tensor([IDS])).logits[0]
    dst = qsparse_infer.convert(out, tmp_path / "ft.qsp", dtype="fp32", progress=False)  # as saved (small: fp32)
    meta = read_metadata(dst)
    assert meta.sparsity == SparsityConfig.uniform(0.5) and meta.config.topk_rescale == "l2"
    dense = Engine.load(dst, device="cpu", sparsity=0.0)
    assert float((dense.logits(IDS) - expected).norm() / expected.norm()) < 2e-3  # transformers runs it dense
    assert isinstance(Engine.load(dst, device="cpu").generate("the king", max_new_tokens=4, temperature=0), str)


def test_init_from_rejections(tmp_path, text, capsys):
    src = make_dense_folder(tmp_path / "hf", "LlamaForCausalLM", tokenizer=True)
    base = ["train", "--init-from", str(src), "--text", str(text), "--steps", "2", "--device", "cpu",
            "--seq-len", "32", "--out", str(tmp_path / "o")]
    assert cli.main(base + ["--sparsity", "0.999"]) == 1
    assert "keeps K = 0" in capsys.readouterr().err
    assert cli.main(base + ["--seq-len", "4096"]) == 1
    assert "exceeds the start model's context" in capsys.readouterr().err
    bitnet = tmp_path / "bn"
    bitnet.mkdir()
    (bitnet / "config.json").write_text(json.dumps({"architectures": ["BitNetForCausalLM"]}))
    assert cli.main(["train", "--init-from", str(bitnet), "--steps", "2", "--out", str(tmp_path / "p")]) == 1
    assert "not a full-precision family" in capsys.readouterr().err
    assert cli.main(["train", "--text", str(text), "--steps", "2", "--out", str(tmp_path / "q")]) == 1
    assert "--text needs --init-from" in capsys.readouterr().err
