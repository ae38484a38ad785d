"""`python -m qsparse_infer.cli ...` is the `qsparse` command."""
import sys

from .main import main

sys.exit(main())
