"""`qsparse serve` options: every bad value is one line on stderr and exit status 1, before the model loads
(issue 17: `--port 99999` was a traceback, `--max-batch 0` / `--max-len 0` were silently replaced and
`--max-len -5` started a server that rejected everything)."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from qsparse_infer.cli import main as cli

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv,says", [
    (["--port", "99999"], "--port must be in 1..65535"),
    (["--port", "0"], "--port must be in 1..65535"),
    (["--port", "-1"], "--port must be in 1..65535"),
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-batch", "-3"], "--max-batch must be >= 1"),
    (["--max-len", "0"], "--max-len must be >= 1"),
    (["--max-len", "-5"], "--max-len must be >= 1"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be >= 1"),
    (["--max-request-bytes", "0"], "--max-request-bytes must be >= 1"),
    (["--max-connections", "0"], "--max-connections must be >= 1"),
    (["--max-connections", str(10 ** 9)], "needs more open files"),
    (["--timeout-header", "0"], "--timeout-header must be a number of seconds > 0"),
    (["--timeout-header", "nan"], "--timeout-header must be a number of seconds > 0"),
    (["--timeout-keep-alive", "-1"], "--timeout-keep-alive must be a number of seconds > 0"),
    (["--timeout-keep-alive", "inf"], "--timeout-keep-alive must be a number of seconds > 0"),
    (["--timeout-body", "0"], "--timeout-body must be a number of seconds > 0"),
    (["--model-name", "  "], "--model-name must not be empty"),
    (["--max-len", "100000"], "--max-len must be in 1..512 (the model's context)"),
    (["--shape", "2b4t", "some.qsp"], "either a model file or --shape"),
])
def test_bad_serve_option_is_one_line_and_exit_1(capsys, argv, says):
    port = [] if "--port" in argv else ["--port", str(free_port())]  # some checks come after the bind
    assert cli.main(["serve", "--device", "cpu", *port, *argv]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qsparse serve: error: ") and says in lines[0], captured.err
    assert "Traceback" not in captured.err + captured.out


def test_taken_port_is_one_line_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--device", "cpu", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]


def test_unknown_host_is_one_line(capsys):
    assert cli.main(["serve", "--device", "cpu", "--host", "no-such-host.invalid"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot listen on no-such-host.invalid" in err[0]


def test_bad_port_in_a_real_process_has_no_traceback():
    """The whole command as a user runs it: status 1, one line, nothing else."""
    r = subprocess.run([sys.executable, "-m", "qsparse_infer.cli", "serve", "--port", "99999"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip() == "qsparse serve: error: --port must be in 1..65535, got 99999"
