"""End-to-end benchmark (thin wrapper of `qsparse bench`): python bench/e2e.py [--shape 2b4t|8b] [...]."""
import argparse
import sys

from qsparse_infer.bench import e2e as bench


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/e2e.py", description=bench.__doc__.splitlines()[0])
    bench.add_arguments(p)
    return bench.run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
