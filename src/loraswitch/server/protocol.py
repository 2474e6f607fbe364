"""Request bodies of the OpenAI-compatible endpoints (parsing and validation only: templating,
splitting and routing are the library's).

Fields we do not implement but that are harmless at their defaults are accepted and ignored
(`extra="allow"`); asking for a feature we lack (tools, logit_bias, best_of...) is a 400 that names
the field, never a silent difference.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from loraswitch.server.errors import bad_request
from loraswitch.switch.request import MAX_LOGPROBS, MAX_REPETITION_PENALTY

MAX_TOP_LOGPROBS = MAX_LOGPROBS  # alternatives per token a request may ask for (the OpenAI limit)
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
# every body: no NaN / Infinity (JSON extensions Python's parser accepts) in any number field
STRICT = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)  # "5" is no max_tokens, true no token id


def bad_text(value: Any, where: str = "") -> str | None:
    """The path of the first string in `value` that is not valid Unicode (a lone surrogate such
    as "\\ud800", which JSON escapes can carry but no tokenizer or UTF-8 encoder takes), else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        found = bad_text(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


class LoraswitchOptions(BaseModel):
    """The `"loraswitch": {...}` extension object (also accepted as top-level fields)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    trace: bool = False  # include the per-token routing trace
    route: str | None = None  # router for model="auto": auto | seq | arrow | gate
    # a weighted mixture, with model="mixture" (server.composition); numbers only, as the library
    # takes them ("0.5" and true were read as 0.5 and 1 here and refused there)
    adapters: dict[str, StrictFloat | StrictInt] | None = None
    allow: list[str] | None = None  # model="auto" chooses only among these adapters
    deny: list[str] | None = None  # ... and never these


class TextPart(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            if part.type == "text" and part.text is None:
                raise bad_request("a text content part needs its \"text\"", f"messages.{index}.content.{j}.text")
            if part.type != "text":
                raise bad_request(f"only text content parts are supported (got type {part.type!r})",
                                  f"messages.{index}.content.{j}.type", "unsupported_content")
            pieces.append(part.text)
        return "\n".join(pieces)  # as vLLM joins a message's text parts


class _Common(BaseModel):
    model_config = STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # vLLM's sampling extensions
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=MAX_REPETITION_PENALTY)
    top_k: int | None = Field(default=None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None  # vLLM's extension: decode past the end-of-turn token to max_tokens
    stop_token_ids: list[int] | None = None  # vLLM's extension: not supported (a 400 when given)
    # loraswitch extensions
    trace: bool | None = None
    route: str | None = None
    loraswitch: LoraswitchOptions | None = None

    def sampling(self) -> dict:
        """The library request's sampling fields beyond temperature and top_p (unset: off)."""
        return {"top_k": self.top_k or 0, "min_p": self.min_p or 0.0,
                "presence_penalty": self.presence_penalty or 0.0, "frequency_penalty": self.frequency_penalty or 0.0,
                "repetition_penalty": self.repetition_penalty if self.repetition_penalty is not None else 1.0}

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise bad_request("at most 4 stop sequences are allowed", "stop")
        if any(s == "" for s in stop):
            raise bad_request("stop sequences must not be empty", "stop")
        return stop

    def want_trace(self) -> bool:
        return bool(self.trace) or bool(self.loraswitch and self.loraswitch.trace)

    def router(self) -> str | None:
        return self.route or (self.loraswitch.route if self.loraswitch else None)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def check_supported(self) -> None:
        where = bad_text(self.model_dump(exclude_none=True))
        if where:
            raise bad_request(f"{where} is not valid Unicode text (it holds a lone surrogate such as \\ud800)",
                              where, "invalid_text")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_parameter")
        if self.stop_token_ids:
            raise bad_request("stop_token_ids is not supported: use stop strings", "stop_token_ids",
                              "unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs=true", "top_logprobs")
        if self.tools or self.functions:
            raise bad_request("tools / function calling are not supported", "tools", "unsupported_parameter")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {'type': 'text'} is supported", "response_format",
                              "unsupported_parameter")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_count(self) -> int | None:
        """None: no logprobs; k: each token's logprob and its k likeliest alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them ("developer" is the newer name of "system")."""
        out = []
        for i, m in enumerate(self.messages):
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": m.text(i)})
        return out


class CompletionRequest(_Common):
    prompt: str | list[Any]  # a string, token ids, or a batch of either: `prompt_inputs` says which
    max_tokens: int | None = Field(default=None, ge=0)  # 0: with echo, the prompt's logprobs alone
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of < (self.n or 1):  # the OpenAI API's and vLLM's rule
            raise bad_request(f"best_of ({self.best_of}) must be at least n ({self.n})", "best_of")
        if (self.best_of or 1) > 1:
            raise bad_request("only best_of=1 is supported", "best_of", "unsupported_value")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix", "unsupported_parameter")
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens must be at least 1 (0 asks for nothing new: only with echo=true, which "
                              "returns the prompt and its logprobs)", "max_tokens")

    @property
    def echo_only(self) -> bool:
        """max_tokens 0 with echo: score the prompt, write nothing (one token is decoded and dropped)."""
        return self.max_tokens == 0 and bool(self.echo)

    def limit(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_inputs(self) -> list[str | list[int]]:
        """The prompts, each as text or token ids: a string, a list of token ids, or a list of
        either (a batch: one choice per prompt, in order)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty", "prompt")
        if all(_token_ids(x) for x in p):
            return [list(p)]
        if all(isinstance(x, str) for x in p):
            return list(p)
        if all(isinstance(x, list) and x and all(_token_ids(t) for t in x) for x in p):
            return [list(x) for x in p]
        raise bad_request("prompt must be a string, a list of token ids, or a batch: a list of strings or a list of "
                          "non-empty token-id lists (not a mix)", "prompt", "invalid_prompt")


def _token_ids(value: Any) -> bool:
    """A token id: an int (a JSON true is no token)."""
    return isinstance(value, int) and not isinstance(value, bool)


class AdapterLoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    path: str = Field(min_length=1)
    name: str | None = Field(default=None, min_length=1)  # "" is no name (a 400), not the folder's
    # prompts the adapter is for: `auto` learns to route to it from them (else zero-shot)
    examples: list[Annotated[str, Field(min_length=1, max_length=4096)]] | None = Field(default=None, max_length=1000)
