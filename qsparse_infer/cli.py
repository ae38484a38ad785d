"""The `qsparse` command. Each subcommand lives in its own module, which defines
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("qsparse_infer.cli_generate", "generate text (streams to the terminal)"),
    "serve": ("qsparse_infer.cli_serve", "serve a model over HTTP (OpenAI-compatible API)"),
    "convert": ("qsparse_infer.convert", "convert a Hugging Face checkpoint into an engine file"),
    "inspect": ("qsparse_infer.inspect", "print an engine file's config, sparsity and sizes"),
    "bench": ("qsparse_infer.bench", "measure decode tokens/s and memory bandwidth"),
    "train": ("qsparse_infer.train", "train a Q-Sparse model from scratch"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="qsparse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (mod_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
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
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"qsparse {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
