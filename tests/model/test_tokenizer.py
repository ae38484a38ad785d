"""Tokenizer over a sentencepiece model and over a tokenizer.json, both trained here; streaming decode."""
from __future__ import annotations

import random

import pytest
from builders import CHAT_TEMPLATE, hf_tokenizer_json, sample_text, sentencepiece_model

from qsparse_infer.model.tokenizer import Tokenizer

TEXTS = ["The king rode to the castle.", "  two  spaces and\nnewline", "café über naïve ☃ 日本 🐉!",
         "", "wind", " leading space"]


@pytest.fixture(scope="module")
def sp():
    return Tokenizer("sentencepiece", sentencepiece_model(), chat_template=CHAT_TEMPLATE,
                     special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


@pytest.fixture(scope="module")
def hf():
    tok = Tokenizer("hf_json", hf_tokenizer_json(), bos_id=0, eos_ids=[1], chat_template=CHAT_TEMPLATE,
                    special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 1
    return tok


def test_sentencepiece_basics(sp):
    assert sp.bos_id == 1 and sp.eos_ids == [2] and sp.vocab_size == 360
    ids = sp.encode("The king rode to the castle.")
    assert ids[0] == 1 and 1 not in ids[1:]
    assert sp.encode("the", add_bos=False)[0] != 1
    for text in TEXTS:  # identity normalization, as Llama-style models use: exact round trip
        assert sp.decode(sp.encode(text)) == text
    # byte fallback: characters outside the trained set still round-trip
    assert sp.decode(sp.encode("🐉 ☃")) == "🐉 ☃"
    # control pieces written in the text become their ids (chat templates spell them out)
    ids = sp.encode("<s>hi</s>", add_bos=False)
    assert ids[0] == 1 and ids[-1] == 2 and sp.decode(ids) == "hi"


def test_hf_json_basics(hf):
    ids = hf.encode("The king rode to the castle.")
    assert ids[0] == 0 and hf.decode(ids) == "The king rode to the castle."
    for text in TEXTS:
        assert hf.decode(hf.encode(text, add_bos=False)) == text
    ids = hf.encode("<|user|>hello", add_bos=False)
    assert ids[0] == hf.token_to_id("<|user|>")


@pytest.mark.parametrize("which", ["sp", "hf"])
def test_chat_template(which, request):
    tok = request.getfixturevalue(which)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"}]
    text = tok.apply_chat_template(msgs)
    assert text == "<s><|user|>hi<|assistant|>hello</s><|user|>more<|assistant|>"
    assert tok.apply_chat_template(msgs[:1], add_generation_prompt=False) == "<s><|user|>hi"


def test_chat_template_errors(hf):
    plain = Tokenizer("hf_json", hf_tokenizer_json())
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="list of"):
        hf.apply_chat_template("hello")
    from jinja2.exceptions import SecurityError

    evil = Tokenizer("hf_json", hf_tokenizer_json(), chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    raising = Tokenizer("hf_json", hf_tokenizer_json(), chat_template="{{ raise_exception('only user turns') }}")
    with pytest.raises(Exception, match="only user turns"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])


def test_invalid_tokenizer_bytes():
    with pytest.raises(ValueError, match="invalid sentencepiece model"):
        Tokenizer("sentencepiece", b"garbage")
    with pytest.raises(ValueError, match="invalid tokenizer.json"):
        Tokenizer("hf_json", b"{}")
    with pytest.raises(ValueError, match="kind"):
        Tokenizer("tiktoken", b"")


def _stream(tok, ids):
    dec = tok.incremental_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


@pytest.mark.parametrize("which", ["sp", "hf"])
def test_incremental_decoder_matches_decode(which, request):
    tok = request.getfixturevalue(which)
    texts = TEXTS + sample_text(20, seed=9)
    for text in texts:
        ids = tok.encode(text)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids), text
        assert not any("\ufffd" in p for p in pieces), text  # partial UTF-8 is held back, never emitted
    rng = random.Random(0)
    for _ in range(100):  # arbitrary id sequences, including lone byte pieces
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids)


def test_incremental_decoder_streams_early(sp):
    ids = sp.encode("the king the queen the castle the river", add_bos=False)
    pieces = _stream(sp, ids)
    assert sum(1 for p in pieces[:-1] if p) >= len(ids) // 2  # text comes out as it is produced
    first = next(p for p in pieces if p)
    assert not first.startswith(" ") and pieces[-1] == ""  # the leading space is stripped; nothing held back


@pytest.mark.parametrize("which", ["sp", "hf"])
def test_ids_past_the_tokenizer_vocab_decode_to_nothing(which, request):
    tok = request.getfixturevalue(which)
    ids = tok.encode("the king", add_bos=False)
    assert tok.decode(ids[:1] + [tok.vocab_size + 5] + ids[1:]) == tok.decode(ids)
