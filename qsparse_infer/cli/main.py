"""The `qsparse` command. Each subcommand lives in its own module, which defines
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings

from safetensors import SafetensorError

DESCRIPTION = "qsparse-infer: run, convert, inspect, benchmark, evaluate and train Q-Sparse (BitNet b1.58 + top-K) models."

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("qsparse_infer.cli.generate", "generate text (streams to the terminal)"),
    "serve": ("qsparse_infer.cli.serve", "serve a model over HTTP (OpenAI-compatible API)"),
    "convert": ("qsparse_infer.convert.hf", "convert a Hugging Face checkpoint into an engine file"),
    "inspect": ("qsparse_infer.convert.inspect", "print an engine file's config, sparsity and sizes"),
    "bench": ("qsparse_infer.bench.e2e", "measure decode tokens/s and memory bandwidth"),
    "eval": ("qsparse_infer.cli.eval", "held-out perplexity and tokens/s, against the sparsity"),
    "train": ("qsparse_infer.train.trainer", "train a Q-Sparse model from scratch, or continue-train a "
                                             "full-precision one (--init-from)"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say what the default is (so `--model`, whose
    help says "default: the built-in model", does not also print "(default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="qsparse", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"qsparse-infer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (mod_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=HelpFormatter)
        if name == chosen:  # only the command being run pays for its imports
            module = importlib.import_module(mod_name)
            module.add_arguments(p)
    return parser, module


def _short_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on a terminal read as one line, without the library's source location."""
    return f"qsparse: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = _short_warning
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    _exit_cleanly_on_sigterm()
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qsparse generate ... | head -c 20`: the reader left, nothing is wrong
        _silence_stdout()
        return 1
    except (ValueError, OSError, RuntimeError, SafetensorError) as e:
        # Bad input: one line naming what is wrong (OSError includes the file name, e.g. permission denied).
        print(f"qsparse {args.command}: error: {e}", file=sys.stderr)
        return 1


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM raises SystemExit (exit status 143), so that `finally` blocks and the writers' clean-up of their
    temp files run, as they do for Ctrl-C."""
    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (main() called from a thread): keep the default
        pass


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
