"""Training data for `qsparse train`: the Shakespeare corpus, its train/validation split by whole works,
the SentencePiece tokenizer, and the token streams the trainer samples from.

The corpus is a folder (or a tar archive of one) of `*_gut.txt` works plus `metadata.txt` (INI-style
sections naming each work's title); see its SOURCE.md. The default is the archive shipped in
qsparse_infer/data. Two whole works are held out for validation, so the validation loss measures
text the model (and the tokenizer) never saw.
"""
from __future__ import annotations

import configparser
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

# Held out for validation: one tragedy and one comedy, both mid-sized (about 4% of the corpus).
DEFAULT_VAL_WORKS = ("macbeth_gut", "twelfth_night_gut")
DEFAULT_VOCAB = 4096
# The Shakespeare corpus ships with the package (42 public-domain works, 5 MB as text; see
# shakespeare-corpus.SOURCE.md beside it), so `qsparse train` reproduces the built-in model from a clone.
BUILTIN_CORPUS = Path(__file__).resolve().parents[1] / "data" / "shakespeare-corpus.tar.xz"  # qsparse_infer/data
ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")
NEWLINE = "\n"


@dataclass
class Work:
    name: str  # file stem, e.g. "hamlet_gut"
    title: str  # from metadata.txt, e.g. "Hamlet"
    text: str


def resolve_corpus(path: str | Path) -> Path:
    """The corpus: a folder, or a tar archive of one (.tar.xz, .tar.gz, .tar). A relative path is tried
    against the working directory, then against the repo root and each folder above it."""
    p = Path(path).expanduser()
    if p.is_dir() or _is_archive(p):
        return p
    if not p.is_absolute():
        repo = Path(__file__).resolve().parents[2]  # qsparse_infer/train/data.py -> the repo root
        for base in (repo, *repo.parents):
            if (base / p).is_dir() or _is_archive(base / p):
                return (base / p).resolve()
    raise FileNotFoundError(f"corpus folder not found: {path} (expected a folder of *_gut.txt works, or a .tar.xz "
                            f"archive of one)")


def _is_archive(p: Path) -> bool:
    return p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES)


def _corpus_files(root: Path) -> dict[str, bytes]:
    """File name -> bytes of every `*_gut.txt` work and `metadata.txt`, from a folder or an archive (read in
    memory, never unpacked to disk)."""
    wanted = lambda name: name.endswith("_gut.txt") or name == "metadata.txt"  # noqa: E731
    if root.is_dir():
        return {f.name: f.read_bytes() for f in root.iterdir() if f.is_file() and wanted(f.name)}
    out: dict[str, bytes] = {}
    with tarfile.open(root) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if member.isfile() and wanted(name):
                out[name] = tar.extractfile(member).read()
    return out


def parse_titles(metadata: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(metadata)
    return {section: parser[section].get("title", section) for section in parser.sections()}


def read_titles(corpus: Path) -> dict[str, str]:
    meta = _corpus_files(resolve_corpus(corpus)).get("metadata.txt")
    return parse_titles(meta.decode("utf-8")) if meta is not None else {}


def load_works(corpus: str | Path = BUILTIN_CORPUS) -> list[Work]:
    """All `*_gut.txt` works, sorted by name (so every run sees the same order)."""
    root = resolve_corpus(corpus)
    files = _corpus_files(root)
    names = sorted(n for n in files if n.endswith("_gut.txt"))
    if not names:
        raise FileNotFoundError(f"no *_gut.txt works in {root}")
    titles = parse_titles(files["metadata.txt"].decode("utf-8")) if "metadata.txt" in files else {}
    works = []
    for name in names:
        stem = name[: -len(".txt")]
        text = files[name].decode("utf-8").replace("\r\n", "\n")
        works.append(Work(stem, titles.get(stem, stem), text))
    return works


def split_works(works: list[Work], val_names: tuple[str, ...] | list[str]) -> tuple[list[Work], list[Work]]:
    by_name = {w.name: w for w in works}
    missing = [n for n in val_names if n not in by_name]
    if missing:
        raise ValueError(f"validation works not in the corpus: {missing} (have e.g. {sorted(by_name)[:5]})")
    if len(set(val_names)) == len(works):
        raise ValueError("every work is held out for validation; nothing is left to train on")
    val = [by_name[n] for n in val_names]
    train = [w for w in works if w.name not in set(val_names)]
    return train, val


def train_tokenizer(works: list[Work], vocab_size: int = DEFAULT_VOCAB) -> bytes:
    """Train a SentencePiece BPE model on the given works; returns the serialized `tokenizer.model`.

    Deterministic: one thread, every line used in corpus order, no sampling or shuffling. Identity
    normalization keeps the text exact; newline is its own piece (SentencePiece trains on lines, so it
    would otherwise fall back to a byte), and byte_fallback covers any character never seen.
    """
    import sentencepiece as spm

    lines = [line for w in works for line in w.text.split(NEWLINE)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, user_defined_symbols=[NEWLINE], allow_whitespace_only_pieces=True,
        split_digits=True, num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        minloglevel=2)
    return model.getvalue()


def load_tokenizer(model_bytes: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model_bytes)


def encode_works(sp, works: list[Work]) -> torch.Tensor:
    """One int32 stream: each work starts with BOS (the document boundary the model learns)."""
    parts = []
    for w in works:
        parts.append(torch.tensor([sp.bos_id(), *sp.encode(w.text)], dtype=torch.int32))
    return torch.cat(parts)


class TokenStream:
    """Windows of seq_len tokens over a stream, and their next-token targets.

    With bos_id set, every window starts with BOS (not only a work's first token), which makes
    "BOS + any text" in-distribution: the engine puts BOS before every prompt, so a prompt such as
    "ROMEO:" then reads as a point inside a play rather than as the title page of a new work.
    With bos_id None, windows are plain slices of the stream (BOS only where a work begins).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, bos_id: int | None) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if tokens.numel() < seq_len + 2:
            raise ValueError(f"token stream of {tokens.numel()} tokens is shorter than one window of {seq_len}")
        self.tokens = tokens.long()
        self.seq_len = seq_len
        self.bos_id = bos_id

    def _window(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bos_id is None:  # x = t[s : s+L], y = t[s+1 : s+L+1]
            w = self.tokens[starts[:, None] + torch.arange(self.seq_len + 1)[None, :]]
            return w[:, :-1], w[:, 1:]
        # x = [BOS, t[s], ..., t[s+L-2]], y = t[s : s+L]
        y = self.tokens[starts[:, None] + torch.arange(self.seq_len)[None, :]]
        return torch.cat([torch.full_like(y[:, :1], self.bos_id), y[:, :-1]], dim=1), y

    def _extra(self) -> int:
        return 1 if self.bos_id is None else 0  # plain windows read one token past the window

    def sample(self, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        high = self.tokens.numel() - self.seq_len - 2 * self._extra() + 1
        return self._window(torch.randint(0, high, (batch,), generator=gen))

    def windows(self, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-overlapping windows covering the stream (the last partial window is dropped)."""
        n = (self.tokens.numel() - self._extra()) // self.seq_len
        if max_windows is not None:
            n = min(n, max_windows)
        return self._window(torch.arange(n) * self.seq_len)
