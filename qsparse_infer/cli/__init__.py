"""The `qsparse` command: `main` (dispatch; each command module has `add_arguments(parser)` and
`run(args) -> int`), `generate` and `serve`. The convert, inspect, bench and train commands live beside what
they run (`convert/hf.py`, `convert/inspect.py`, `bench/e2e.py`, `train/trainer.py`)."""
