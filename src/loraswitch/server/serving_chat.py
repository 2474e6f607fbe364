"""POST /v1/chat/completions: a conversation, answered in the model's chat template.

With `model="auto"` a last user message that numbers its parts is answered part by part (the
library's fan-out); `logprobs` / `top_logprobs` are reported as in the OpenAI API.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest

from loraswitch.generate import Generation, TokenLogprob
from loraswitch.server.protocol import ChatCompletionRequest
from loraswitch.server.scheduler import Job
from loraswitch.server.serving import OpenAIServing
from loraswitch.server.state import ServerState, state
from loraswitch.server.token_bytes import token_bytes
from loraswitch.switch.request import Request

router = APIRouter(prefix="/v1")


class ChatServing(OpenAIServing):
    kind, id_prefix, param = "chat", "chatcmpl-", "messages"
    body: ChatCompletionRequest

    def build(self) -> Request:
        return Request(messages=tuple(self.body.conversation()))

    def choice(self, job: Job, answer: Generation) -> dict:
        logprobs = self.logprobs(answer.logprobs) if job.request.logprobs is not None else None
        return {"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": logprobs,
                "finish_reason": answer.finish_reason, "stop_reason": answer.stop_reason}

    def chunk_choice(self, text, finish, logprobs) -> dict:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": self.logprobs(logprobs) if logprobs is not None else None,
                "finish_reason": finish}

    def stream_start(self, job: Job) -> list[dict]:
        first = {**self.head(job, self.body.model, chunk=True), "choices": [self.chunk_choice("", None, None)],
                 **self._no_usage_yet()}
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return [first]

    def logprobs(self, items: list[TokenLogprob]) -> dict:
        """The OpenAI chat shape: per token its text, logprob, UTF-8 bytes and the alternatives."""
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self.token_text(token_id), "logprob": logprob, "bytes": token_bytes(self.tok, token_id)}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in items]}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, raw: HTTPRequest, st: ServerState = Depends(state)):
    return await ChatServing(st, body).serve(raw)
