"""OpenAI-compatible request bodies (pydantic) and the error shape.

Validation is strict: a number field takes only a JSON number (no bool, no string: `max_tokens: true` and
`"10"` are errors, not 1 and 10), floats must be finite (`Infinity` / `NaN` are refused), and every string
must be valid Unicode (a lone surrogate such as `"\\ud800"` is refused before anything echoes it). Sizes that
would let one request slow every other one are capped here (stop strings, logprobs, n, prompts per request).
Field bounds are checked by pydantic (the app turns its validation errors into 400s); rules that span fields
are in api.py."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .requests import MAX_LOGPROBS  # as vLLM's default max_logprobs

MAX_STOP_STRINGS = 16  # OpenAI allows 4; each one is matched against the text at every step
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_N = 32  # completions per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_CHOICES = 128  # prompts x n
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what a 64-bit generator seed can hold


def printable(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates) written as escapes, so that an error
    message quoting a client's input can always be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, printable(message), type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the string is not valid Unicode (a lone surrogate at character {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
StopString = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Strict(BaseModel):
    # extra="forbid": an unknown field is an error rather than silently ignored (a typo'd `max_token` would
    # otherwise generate 16 tokens without a word)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension; accepted, usage comes in the final chunk only


class _Sampling(_Strict):
    """Fields shared by completions and chat."""

    model: Text
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=2 ** 31 - 1, description="extension: keep the k most likely tokens (0 or -1 = off)")
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0,
                                      description="extension: CTRL-style multiplicative penalty")
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)], None] = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = \
        Field(None, description="extension (vLLM's name): token ids that end the completion like EOS")
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: generate past the end-of-sequence token")
    logit_bias: dict[Text, float] | None = None
    user: Text | None = None
    return_token_ids: bool = Field(False, description="extension: each choice also lists its token ids")


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: Union[Text, TokenIds, Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 only with echo
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: Text | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    # extra="allow": clients send fields this server does not use (name, tool_calls...); templates may read them
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    role: Text
    content: Union[Text, list[TextPart], None] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
