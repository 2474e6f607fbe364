"""POST /v1/completions: raw text (or token ids) continued, no chat template, never split.

`logprobs: k` reports each token's logprob and its k likeliest alternatives, `echo` the prompt
before the answer with its tokens' logprobs (from the prefill, routed as the prompt was): what
evaluation harnesses use to score multiple-choice answers; with `max_tokens: 0` the prompt and
its logprobs alone (vLLM's and the legacy OpenAI API's way of scoring a text). A list of prompts
is a batch: one choice per prompt (times `n`), as in the OpenAI API, all decoded together.
"""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest

from loraswitch.generate import Generation, TokenLogprob
from loraswitch.server.errors import bad_request
from loraswitch.server.protocol import CompletionRequest
from loraswitch.server.serving import Choice, OpenAIServing
from loraswitch.server.state import ServerState, state
from loraswitch.switch.request import Request

router = APIRouter(prefix="/v1")


class CompletionServing(OpenAIServing):
    kind, id_prefix, param = "completion", "cmpl-", "prompt"
    body: CompletionRequest

    def __init__(self, st: ServerState, body: CompletionRequest):
        super().__init__(st, body)
        self._offsets: dict[int, int] = {}  # per choice: characters of answer tokens streamed so far

    def build(self) -> list[Request]:
        if self.body.echo and self.body.stream:
            raise bad_request("echo is not supported with stream=true", "echo", "unsupported_parameter")
        vocab, out = len(self.tok), []
        for i, prompt in enumerate(self.body.prompt_inputs()):
            if isinstance(prompt, list) and any(t < 0 or t >= vocab for t in prompt):
                where = "prompt" if isinstance(self.body.prompt[0], int) else f"prompt.{i}"
                raise bad_request(f"prompt token ids must be in [0, {vocab})", where)
            out.append(Request(prompt=prompt if isinstance(prompt, str) else tuple(prompt), echo=bool(self.body.echo)))
        return out

    def choice(self, choice: Choice, answer: Generation) -> dict:
        request = choice.job.request
        text, ids, items = answer.text, list(answer.token_ids), list(answer.logprobs)
        if request.echo:
            shown = request.prompt if isinstance(request.prompt, str) else self.tok.decode(list(request.prompt_ids))
            text, ids, items = shown + text, answer.prompt_ids + ids, answer.prompt_logprobs + items
        logprobs = self.logprobs(items, ids) if request.logprobs is not None else None
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": answer.finish_reason,
                "stop_reason": answer.stop_reason}

    def shown(self, answer: Generation) -> Generation:
        """An echo-only request's answer: the one token decoded to read the prompt is dropped."""
        if not self.body.echo_only:
            return answer
        return replace(answer, token_ids=[], text="", logprobs=[], trace=[], finish_reason="length", stop_reason=None)

    def chunk_choice(self, index, text, finish, logprobs) -> dict:
        chosen = None
        if logprobs is not None:  # offsets count from the answer's start, across chunks (as vLLM's)
            at = self._offsets.get(index, 0)
            chosen = self.logprobs(logprobs, [lp.token_id for lp in logprobs], at)
            self._offsets[index] = at + sum(len(t) for t in chosen["tokens"])
        return {"index": index, "text": text or "", "logprobs": chosen, "finish_reason": finish}

    def logprobs(self, items: list[TokenLogprob | None], token_ids: list[int], start: int = 0) -> dict:
        """The OpenAI completions shape: parallel lists of tokens, their logprobs (None: the first
        prompt token, which has no context), the alternatives and each token's text offset
        (`start`: the characters before these tokens). The alternatives hold the chosen token
        too, as the OpenAI API and vLLM have them (up to k + 1; `logprobs: 0` gives it alone)."""
        tokens = [self.token_text(t) for t in token_ids]
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob if lp else None for lp in items],
                "top_logprobs": [self._alternatives(lp) if lp else None for lp in items],
                "text_offset": offsets}

    def _alternatives(self, lp: TokenLogprob) -> dict[str, float]:
        return {**{self.token_text(t): v for t, v in lp.top}, self.token_text(lp.token_id): lp.logprob}


@router.post("/completions")
async def completions(body: CompletionRequest, raw: HTTPRequest, st: ServerState = Depends(state)):
    return await CompletionServing(st, body).serve(raw)
