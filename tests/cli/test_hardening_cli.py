"""Issue 10, the CLI and the Python API as a newcomer meets them: one-line errors with exit code 1 (never a
traceback), --help / --version, token-id prompts, prompts that are not valid text, sampling edge cases."""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from builders import (engine_tensors, hf_tokenizer_json, make_bitnet_folder, random_reference,
                      sentencepiece_model, tiny_config)
from safetensors import safe_open
from safetensors.torch import save_file

from qsparse_infer.cli import main as cli
from qsparse_infer import Engine
from qsparse_infer.model.config import SparsityConfig
from qsparse_infer.model.format import write_engine
from qsparse_infer.generate.sampling import SamplingSettings, sample_cpu

CFG = tiny_config(vocab_size=400, max_seq_len=32)


@pytest.fixture(scope="module")
def tensors():
    return engine_tensors(random_reference(CFG, seed=5))


def _engine_file(path, tensors, kind="sentencepiece"):
    if kind == "none":
        return write_engine(path, CFG, SparsityConfig(), tensors)
    data = sentencepiece_model() if kind == "sentencepiece" else hf_tokenizer_json()
    return write_engine(path, CFG, SparsityConfig(), tensors, {"kind": kind, "bos_id": 1, "eos_ids": [2]}, data)


def _one_line_error(capsys, argv, *fragments):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("qsparse: warning:")]
    assert rc == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


# -- 4. every bad input: one line naming the file and what is wrong, exit code 1 ---------------------------------


@pytest.mark.parametrize("edit,what", [
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": None}, "invalid model"),
    ({"rms_norm_eps": "abc"}, "invalid model"),
    ({"quantization_config": "bitnet"}, "quantization_config"),
])
def test_cli_convert_bad_config_is_one_line(tmp_path, capsys, edit, what):
    src = make_bitnet_folder(tmp_path / "hf", extra_config=edit)
    _one_line_error(capsys, ["convert", str(src), str(tmp_path / "m.qsp")], "config.json", what)


def test_cli_convert_corrupt_shard_is_one_line(tmp_path, capsys):
    src = make_bitnet_folder(tmp_path / "hf")
    p = src / "model.safetensors"
    p.write_bytes(p.read_bytes() + b"\0")
    _one_line_error(capsys, ["convert", str(src), str(tmp_path / "m.qsp")], str(p))


def test_cli_convert_index_without_weight_map_is_one_line(tmp_path, capsys):
    src = make_bitnet_folder(tmp_path / "hf")
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    _one_line_error(capsys, ["convert", str(src), str(tmp_path / "m.qsp")], "model.safetensors.index.json",
                    "weight_map")


def test_cli_unreadable_file_is_one_line(tmp_path, capsys, monkeypatch, tensors):
    path = _engine_file(tmp_path / "m.qsp", tensors)
    if os.geteuid() != 0:
        os.chmod(path, 0)
    else:  # root reads anything: make the open fail as it would for another user
        import builtins

        real_open = builtins.open

        def no_read(file, *a, **kw):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *a, **kw)

        monkeypatch.setattr(builtins, "open", no_read)
    _one_line_error(capsys, ["inspect", str(path)], "Permission denied", str(path))


def test_cli_special_tokens_list_is_one_line(tmp_path, capsys, tensors):
    path = _engine_file(tmp_path / "m.qsp", tensors)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["tokenizer"])
    info["special_tokens"] = ["<s>", "</s>"]
    meta["tokenizer"] = json.dumps(info)
    save_file(ts, str(path), metadata=meta)
    _one_line_error(capsys, ["generate", "--model", str(path), "--device", "cpu", "hi"], str(path),
                    "special_tokens")


@pytest.mark.parametrize("kind", ["hf_json", "sentencepiece"])
def test_invalid_utf8_prompt_is_one_line(tmp_path, capsys, tensors, kind):
    path = _engine_file(tmp_path / "m.qsp", tensors, kind)
    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # how Python passes such argv bytes
    line = _one_line_error(capsys, ["generate", "--model", str(path), "--device", "cpu", prompt],
                           "not valid Unicode")
    assert "C++ type" not in line
    with pytest.raises(ValueError, match="not valid Unicode"):
        Engine.load(path, device="cpu").tokenizer.encode(prompt)


def test_broken_pipe_is_quiet(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = (f"{sys.executable} -m qsparse_infer.cli generate --device cpu --max-new-tokens 80 --temperature 0 "
           f"'ROMEO:' | head -c 20")
    proc = subprocess.run(["bash", "-c", "set -o pipefail; " + cmd], capture_output=True, text=True, env=env,
                          timeout=300)
    assert len(proc.stdout) == 20
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 1


# -- newcomer: --help, --version, defaults, CLI wording --------------------------------------------------------


def test_help_is_whole_and_version_exists(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1].replace("\n", " ")
    assert description.rstrip().endswith(".")
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    from qsparse_infer import __version__

    assert e.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize("command,default", [("generate", "(default: 256)"), ("convert", "(default: bf16)"),
                                             ("train", "(default: ")])
def test_subcommand_help_shows_defaults(capsys, command, default):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert default in capsys.readouterr().out


@pytest.mark.parametrize("command", ["generate", "serve", "convert", "inspect", "bench", "train"])
def test_each_option_states_its_default_once(command):
    """No option's help says its default twice (a hand-written "default: ..." and the formatter's "(default: X)")."""
    parser, _ = cli.build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.help in (None, argparse.SUPPRESS):
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert text.lower().count("default") <= 1, (command, action.option_strings, text)


def test_cli_gpu_errors_use_cli_spelling(capsys, monkeypatch):
    from qsparse_infer.kernels import _ext

    class NoGpu:
        @staticmethod
        def require_gpu():
            raise RuntimeError('no CUDA GPU available (no driver); use device="cpu" for the reference path')

    monkeypatch.setattr(_ext, "ext", lambda: NoGpu)
    line = _one_line_error(capsys, ["generate", "--device", "cuda", "hi"], "--device cpu")
    assert "reference path" not in line
    line = _one_line_error(capsys, ["bench"], "no CPU mode")
    assert "device" not in line


def test_cli_generate_with_token_ids_for_a_model_without_tokenizer(tmp_path, capsys, tensors):
    path = _engine_file(tmp_path / "m.qsp", tensors, "none")
    line = _one_line_error(capsys, ["generate", "--model", str(path), "--device", "cpu", "hello"], "--ids")
    assert "generation.generate_tokens" not in line
    rc = cli.main(["generate", "--model", str(path), "--device", "cpu", "--ids", "1,5,9", "--max-new-tokens", "4",
                   "--temperature", "0"])
    out = capsys.readouterr().out.split()
    assert rc == 0 and len(out) == 4 and all(0 <= int(t) < CFG.vocab_size for t in out)
    eng = Engine.load(path, device="cpu")
    from qsparse_infer.generate.generation import generate_tokens

    assert [int(t) for t in out] == list(generate_tokens(eng, [1, 5, 9], max_new_tokens=4, temperature=0))


def test_cli_generate_ids_with_a_tokenizer_streams_text(tmp_path, capsys, tensors):
    path = _engine_file(tmp_path / "m.qsp", tensors)
    rc = cli.main(["generate", "--model", str(path), "--device", "cpu", "--ids", "1 5 9", "--max-new-tokens", "5",
                   "--temperature", "0"])
    out = capsys.readouterr().out
    eng = Engine.load(path, device="cpu")
    assert rc == 0 and out == eng.generate([1, 5, 9], max_new_tokens=5, temperature=0) + "\n"


# -- 8. Python API edge cases -----------------------------------------------------------------------------------


def test_bytes_prompt_is_refused(tmp_path, tensors):
    eng = Engine.load(_engine_file(tmp_path / "m.qsp", tensors), device="cpu")
    for bad in (b"ROMEO:", bytearray(b"ROMEO:")):
        with pytest.raises(TypeError, match="not bytes"):
            eng.generate(bad, max_new_tokens=2)


def test_kv_cache_is_validated_on_the_cpu(tmp_path, tensors):
    path = _engine_file(tmp_path / "m.qsp", tensors)
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        Engine.load(path, device="cpu", kv_cache="fp8")


@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-30, 1e-7])
def test_tiny_temperature_acts_greedy(temperature):
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 30
    seen = torch.zeros(1000, dtype=torch.bool)
    s = SamplingSettings(temperature=temperature, seed=3)
    assert s.greedy
    assert sample_cpu(logits, s, seen, 3, 0) == int(torch.argmax(logits))


def test_engine_text_methods_have_real_signatures():
    for name in ("generate", "stream"):
        params = inspect.signature(getattr(Engine, name)).parameters
        for p in ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
                  "stop"):
            assert p in params, (name, p)
        assert getattr(Engine, name).__doc__
    params = inspect.signature(Engine.chat).parameters
    assert "messages" in params and "temperature" in params and Engine.chat.__doc__
    assert not any(p.kind == p.VAR_KEYWORD for m in ("generate", "stream", "chat")
                   for p in inspect.signature(getattr(Engine, m)).parameters.values())


def test_gpu_skip_reason_names_what_is_missing():
    import importlib.util

    from conftest import GPU_OK, GPU_SKIP_REASON

    if GPU_OK:
        pytest.skip("a GPU is here: nothing is skipped")
    compiled = importlib.util.find_spec("qsparse_infer._C") is not None
    if compiled:
        assert "missing" not in GPU_SKIP_REASON and "GPU" in GPU_SKIP_REASON
    else:
        assert "qsparse_infer._C is missing" in GPU_SKIP_REASON


@pytest.mark.filterwarnings("ignore:.*has no tokenizer")
def test_cli_disk_full_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    import errno
    import importlib

    fmt = importlib.import_module("qsparse_infer.model.format")

    def full(f, tensors, metadata):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "m.qsp"))

    monkeypatch.setattr(fmt, "write_safetensors", full)
    src = make_bitnet_folder(tmp_path / "hf")
    _one_line_error(capsys, ["convert", str(src), str(tmp_path / "m.qsp")], "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
