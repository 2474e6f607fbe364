"""POST /v1/chat/completions: a conversation, answered in the model's chat template.

With `model="auto"` a last user message that numbers its parts is answered part by part (the
library's fan-out); `logprobs` / `top_logprobs` are reported as in the OpenAI API.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi import Request as HTTPRequest

from loraswitch.generate import Generation, TokenLogprob
from loraswitch.server.protocol import ChatCompletionRequest
from loraswitch.server.serving import Choice, OpenAIServing
from loraswitch.server.state import ServerState, state
from loraswitch.server.token_bytes import token_bytes
from loraswitch.switch.request import Request

router = APIRouter(prefix="/v1")


class ChatServing(OpenAIServing):
    kind, id_prefix, param = "chat", "chatcmpl-", "messages"
    body: ChatCompletionRequest

    def build(self) -> list[Request]:
        return [Request(messages=tuple(self.body.conversation()))]

    def choice(self, choice: Choice, answer: Generation) -> dict:
        logprobs = self.logprobs(answer.logprobs) if choice.job.request.logprobs is not None else None
        return {"index": choice.index, "message": {"role": "assistant", "content": answer.text}, "logprobs": logprobs,
                "finish_reason": answer.finish_reason, "stop_reason": answer.stop_reason}

    def chunk_choice(self, index, text, finish, logprobs) -> dict:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": self.logprobs(logprobs) if logprobs is not None else None,
                "finish_reason": finish}

    def stream_start(self) -> list[dict]:
        """Each choice's first chunk names the role (OpenAI's)."""
        out = []
        for c in self.choices:
            first = {**self.head(self.body.model, chunk=True), "choices": [self.chunk_choice(c.index, "", None, None)],
                     **self._no_usage_yet()}
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            out.append(first)
        return out

    def logprobs(self, items: list[TokenLogprob]) -> dict:
        """The OpenAI chat shape: per token its text, logprob, UTF-8 bytes and the alternatives."""
        def entry(token_id: int, logprob: float) -> dict:
            return {"token": self.token_text(token_id), "logprob": logprob, "bytes": token_bytes(self.tok, token_id)}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in items]}


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, raw: HTTPRequest, st: ServerState = Depends(state)):
    return await ChatServing(st, body).serve(raw)
