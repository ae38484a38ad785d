"""Issue 10: the training corpus ships with the project, so `qsparse train` works from a fresh clone."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from qsparse_infer.train import data as td
from qsparse_infer.train.trainer import DEFAULT_CORPUS


def test_default_corpus_loads_from_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo root: the default must not depend on the working directory
    works = td.load_works(DEFAULT_CORPUS)
    assert len(works) == 42
    by_name = {w.name: w for w in works}
    assert by_name["macbeth_gut"].title == "Macbeth" and "Twelfth" in by_name["twelfth_night_gut"].title
    assert all(len(w.text) > 1_000 and "\r" not in w.text for w in works)
    assert 4_500_000 < sum(len(w.text) for w in works) < 6_000_000
    train, val = td.split_works(works, td.DEFAULT_VAL_WORKS)
    assert len(train) == 40 and [w.name for w in val] == list(td.DEFAULT_VAL_WORKS)
    assert (Path(td.BUILTIN_CORPUS).parent / "shakespeare-corpus.SOURCE.md").is_file()


SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "shakespeare"


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared corpus folder is not beside this clone")
def test_archive_matches_the_folder_it_was_made_from():
    def digest(works):
        return [(w.name, w.title, hashlib.sha256(w.text.encode()).hexdigest()) for w in works]

    assert digest(td.load_works(td.BUILTIN_CORPUS)) == digest(td.load_works(SHARED))
