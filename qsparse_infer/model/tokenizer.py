"""One tokenizer interface over a sentencepiece model or a Hugging Face tokenizer.json (both held as bytes
in the engine file), with chat templates (sandboxed jinja2) and an incremental decoder for streaming."""
from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Iterable, Sequence

KINDS = ("sentencepiece", "hf_json")


class Tokenizer:
    def __init__(self, kind: str, data: bytes, *, bos_id: int | None = None, eos_ids: Iterable[int] = (),
                 pad_id: int | None = None, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.data = data
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.pad_id = pad_id
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        if kind == "sentencepiece":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.LoadFromSerializedProto(data)
            except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
                raise ValueError(f"invalid sentencepiece model: {e}") from None
            self.vocab_size = self._sp.get_piece_size()
            # Control pieces (<s>, </s>, ...) are not recognised by sp.encode; we split them out of the text
            # ourselves so that chat templates which spell them out work.
            self._control = {self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)}
            if self.bos_id is None and self._sp.bos_id() >= 0:
                self.bos_id = self._sp.bos_id()
            if not self.eos_ids and self._sp.eos_id() >= 0:
                self.eos_ids = [self._sp.eos_id()]
        else:
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_str(data.decode("utf-8"))
            except Exception as e:
                raise ValueError(f"invalid tokenizer.json: {e}") from None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            self._control = {}
        self._special_re = (re.compile("(" + "|".join(re.escape(p) for p in
                                                      sorted(self._control, key=len, reverse=True)) + ")")
                            if self._control else None)

    @classmethod
    def from_engine_file(cls, ef) -> "Tokenizer":
        info = ef.tokenizer_info
        if info.get("kind", "none") == "none" or ef.tokenizer_bytes is None:
            raise ValueError("this engine file has no tokenizer; pass token ids instead of text")
        return cls(info["kind"], ef.tokenizer_bytes, bos_id=info.get("bos_id"), eos_ids=info.get("eos_ids", []),
                   pad_id=info.get("pad_id"), chat_template=info.get("chat_template"),
                   special_tokens=info.get("special_tokens") or {})

    # -- encoding / decoding --------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. from invalid UTF-8 on a command line
            raise ValueError(f"the text is not valid Unicode (character {e.start}: {text[e.start]!r}); it was "
                             f"probably read from bytes that are not UTF-8") from None
        if self.kind == "sentencepiece":
            ids: list[int] = []
            parts = self._special_re.split(text) if self._special_re else [text]
            for part in parts:
                if part in self._control:
                    ids.append(self._control[part])
                elif part:
                    ids.extend(self._sp.encode(part))
        else:
            ids = list(self._hf.encode(text, add_special_tokens=False).ids)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # Models may have more embedding rows than the tokenizer has tokens (e.g. 32002 vs 32000); such ids
        # decode to nothing, as tokenizers.Tokenizer does, instead of raising in the middle of a stream.
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size])  # control pieces decode to ""
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        if self.kind == "sentencepiece":
            return self._sp.id_to_piece(int(token_id)) if 0 <= token_id < self.vocab_size else None
        return self._hf.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "sentencepiece":
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
        return self._hf.token_to_id(token)

    # -- chat -----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use plain-text generation instead")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        template = _compile_template(self.chat_template)
        variables = {**self.special_tokens, **extra}
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    def incremental_decoder(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


def _compile_template(source: str):
    """Compile a chat template the way transformers does (trim/lstrip blocks, loop controls), sandboxed."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"invalid chat template: {e}") from None


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces whose concatenation equals tokenizer.decode(all ids).

    Each step decodes a short window (the previous token(s) plus the new ones) so that context-dependent
    detokenization (sentencepiece's stripped leading space, byte-fallback pieces forming one UTF-8
    character) comes out right; text ending in U+FFFD (an incomplete UTF-8 sequence) is held back.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # ids before this are already emitted
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self.tok.decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd") and new_text.startswith(prefix_text):
            piece = new_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Return whatever is still held back (call once at the end of the stream)."""
        full = self.tok.decode(self.ids)
        if full.startswith(self.text):
            piece = full[len(self.text):]
        else:  # cannot happen for well-behaved decoders; emit the tail of the window instead
            piece = self.tok.decode(self.ids[self.prefix_offset:])[len(self.tok.decode(
                self.ids[self.prefix_offset:self.read_offset])):]
        self.text += piece
        self.prefix_offset = self.read_offset = len(self.ids)
        return piece
