"""Bad full-precision checkpoints: each gets one line on stderr and exit status 1 from `qsparse convert`, leaves no
output (nor temp file) behind and does not touch the input."""
from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch
from builders import make_dense_folder
from safetensors.torch import load_file, save_file

from qsparse_infer.cli.main import main


@pytest.fixture
def src(tmp_path):
    return make_dense_folder(tmp_path / "hf", "Qwen2ForCausalLM", shard_size="40KB")


def _digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _shard_of(folder, name):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def _edit_tensor(folder, name, fn):
    path = _shard_of(folder, name)
    sd = load_file(str(path))
    sd[name] = fn(sd[name])
    save_file(sd, str(path), metadata={"format": "pt"})


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def _nan_late(t):
    t = t.clone()
    t.view(-1)[7] = math.nan
    return t


def _remove_shard(folder):
    _shard_of(folder, "model.layers.1.mlp.down_proj.weight").unlink()


BAD = {
    "unsupported architecture": (lambda f: _edit_config(f, architectures=["GPT2LMHeadModel"]),
                                 r"unsupported architecture \['GPT2LMHeadModel'\]"),
    "missing shard": (_remove_shard, r"shard model-\d+-of-\d+\.safetensors named in model\.safetensors\.index\.json "
                                     r"is missing"),
    "shape mismatch": (lambda f: _edit_tensor(f, "model.layers.1.self_attn.k_proj.weight", lambda t: t[:16].clone()),
                       r"'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(16, 64\), but the config implies "
                       r"\(32, 64\)"),
    "dtype mismatch": (lambda f: _edit_tensor(f, "model.layers.0.mlp.up_proj.weight", lambda t: t.to(torch.int8)),
                       r"'model\.layers\.0\.mlp\.up_proj\.weight' has dtype I8; expected a float tensor"),
    "NaN weights": (lambda f: _edit_tensor(f, "model.layers.1.mlp.down_proj.weight", _nan_late),
                    r"'model\.layers\.1\.mlp\.down_proj\.weight' contains NaN or infinite values"),
    "NaN bias": (lambda f: _edit_tensor(f, "model.layers.0.self_attn.v_proj.bias", _nan_late),
                 r"'model\.layers\.0\.self_attn\.v_proj\.bias' contains NaN"),
    "missing bias": (lambda f: _edit_tensor(f, "model.layers.0.self_attn.q_proj.bias", lambda t: t[:0].clone()),
                     r"q_proj\.bias' has shape \(0,\), but the config implies \(64,\)"),
    "yarn rope": (lambda f: _edit_config(f, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None),
                  r"RoPE scaling 'yarn' is not supported \(supported: default, linear, llama3\)"),
    "quantized": (lambda f: _edit_config(f, quantization_config={"quant_method": "gptq", "bits": 4}),
                  r"quantization_config \('gptq'\): quantized Qwen2ForCausalLM checkpoints are not supported"),
    "gelu": (lambda f: _edit_config(f, hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    "missing key": (lambda f: _edit_config(f, intermediate_size=None), r"lacks required key 'intermediate_size'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_one_line_and_exit_1(src, tmp_path, capsys, case):
    edit, message = BAD[case]
    edit(src)
    before = _digest(src)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["convert", str(src), str(out / "m.qsp")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if not line.startswith("qsparse: warning:")]
    assert len(errors) == 1 and errors[0].startswith("qsparse convert: error: "), err
    assert re.search(message, errors[0]), errors[0]
    assert list(out.iterdir()) == []  # no output, no temp file
    assert _digest(src) == before


@pytest.mark.parametrize("spec, message", [
    ("0.999", r"sparsity\.attn = 0\.999 keeps K = 0 of 64 input channels"),
    ("attn=0.5,up=0.995", r"sparsity\.up = 0\.995 keeps K = 0 of 64"),
    ("0.5,0.5", r"sparsity must be one ratio, four"),
    ("gate=1.5", r"sparsity\.mlp must be a number in \[0, 1\)"),
])
def test_sparsity_leaving_k0_is_one_line_and_exit_1(src, tmp_path, capsys, spec, message):

    assert main(["convert", str(src), str(tmp_path / "m.qsp"), "--sparsity", spec]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("qsparse: warning:")]
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "m.qsp").exists()


def test_distinct_gate_up_refused_for_ternary(tmp_path, capsys):
    from builders import make_qsparse_folder, tiny_config

    folder, _ = make_qsparse_folder(tmp_path / "q", tiny_config(vocab_size=400))
    assert main(["convert", str(folder), str(tmp_path / "m.qsp"), "--sparsity", "gate=0.6,up=0.4"]) == 1
    assert "distinct gate and up ratios need a full-precision model" in capsys.readouterr().err


def test_llama_with_o_bias_refused(tmp_path, capsys):
    src = make_dense_folder(tmp_path / "hf", "LlamaForCausalLM", extra_config={"attention_bias": True})
    assert main(["convert", str(src), str(tmp_path / "m.qsp")]) == 1
    assert "attention_bias or mlp_bias is not supported" in capsys.readouterr().err


def test_success_prints_one_summary_line(src, tmp_path, capsys):
    assert main(["convert", str(src), str(tmp_path / "m.qsp"), "--sparsity", "attn=0.5,gate=0.6,up=0.4"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "format v2, bf16" in out[0] and "gate=0.6, up=0.4" in out[0]
