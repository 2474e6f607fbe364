"""POST /v1/completions: raw text (or token ids) continued, no chat template, never split.

`logprobs: k` reports each token's logprob and its k likeliest alternatives, `echo` the prompt
before the answer with its tokens' logprobs (from the prefill, routed as the prompt was): what
evaluation harnesses use to score multiple-choice answers.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest

from loraswitch.generate import Generation, TokenLogprob
from loraswitch.server.errors import bad_request
from loraswitch.server.protocol import CompletionRequest
from loraswitch.server.scheduler import Job
from loraswitch.server.serving import OpenAIServing
from loraswitch.server.state import ServerState, state
from loraswitch.switch.request import Request

router = APIRouter(prefix="/v1")


class CompletionServing(OpenAIServing):
    kind, id_prefix, param = "completion", "cmpl-", "prompt"
    body: CompletionRequest
    _offset = 0  # characters of answer tokens streamed so far (each request gets its own serving object)

    def build(self) -> Request:
        prompt = self.body.prompt_input()
        if self.body.echo and self.body.stream:
            raise bad_request("echo is not supported with stream=true", "echo", "unsupported_parameter")
        if isinstance(prompt, str):
            return Request(prompt=prompt, echo=bool(self.body.echo))
        vocab = len(self.tok)
        if any(t < 0 or t >= vocab for t in prompt):
            raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
        return Request(prompt=tuple(prompt), echo=bool(self.body.echo))

    def choice(self, job: Job, answer: Generation) -> dict:
        request = job.request
        text, ids, items = answer.text, list(answer.token_ids), list(answer.logprobs)
        if request.echo:
            shown = request.prompt if isinstance(request.prompt, str) else self.tok.decode(list(request.prompt_ids))
            text, ids, items = shown + text, answer.prompt_ids + ids, answer.prompt_logprobs + items
        logprobs = self.logprobs(items, ids) if request.logprobs is not None else None
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": answer.finish_reason,
                "stop_reason": answer.stop_reason}

    def chunk_choice(self, text, finish, logprobs) -> dict:
        chosen = None
        if logprobs is not None:  # offsets count from the answer's start, across chunks (as vLLM's)
            chosen = self.logprobs(logprobs, [lp.token_id for lp in logprobs], self._offset)
            self._offset += sum(len(t) for t in chosen["tokens"])
        return {"index": 0, "text": text or "", "logprobs": chosen, "finish_reason": finish}

    def logprobs(self, items: list[TokenLogprob | None], token_ids: list[int], start: int = 0) -> dict:
        """The OpenAI completions shape: parallel lists of tokens, their logprobs (None: the first
        prompt token, which has no context), the alternatives and each token's text offset
        (`start`: the characters before these tokens)."""
        tokens = [self.token_text(t) for t in token_ids]
        offsets, at = [], start
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {"tokens": tokens, "token_logprobs": [lp.logprob if lp else None for lp in items],
                "top_logprobs": [{self.token_text(t): v for t, v in lp.top} if lp else None for lp in items],
                "text_offset": offsets}


@router.post("/completions")
async def completions(body: CompletionRequest, raw: HTTPRequest, st: ServerState = Depends(state)):
    return await CompletionServing(st, body).serve(raw)
