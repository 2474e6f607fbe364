"""Answering a prompt that mixes tasks, part by part (`auto` on a numbered multi-part prompt).

A chat request whose last user message numbers its parts ("1. ...", "2. ...", the grammar of
`loraswitch.numbered`) is fanned out: each part becomes a row of the same batch, its own prompt
(the conversation with that message replaced by the part), routed on the part's own words. The
parts share the request's `max_tokens` (what is left after the separators the assembly writes,
so the whole answer stays within it) as a pool (`TokenPool`): each starts with an equal share,
and a part that ends early hands what it did not use to the parts still writing, so a long
answer beside short ones is not cut at 1/n of the budget. At most `max_parts` parts (the server's
`--max-parts`): a prompt of a hundred numbered lines must not become a hundred rows. All rows
decode together in one batched forward (several, beyond the batch limit); the answers are assembled in order into one numbered answer ("1. ...\\n2. ..."),
with a trace that labels every token with its part and one switch event per part.

Why rows and not one pass with one KV cache: a decision per part cannot flicker token by token
(MeteoRA needs top-2 and a hand-set temperature of 15-30 to keep per-token gates from doing
exactly that), and an adapter trained on single requests answers a part correctly only when the
part is all it reads. In one pass every part's adapter reads the whole multi-part prompt and
tends to answer another part; measured on the demo suite that cost most of the per-part accuracy.
The oracle of `loraswitch eval` answers composites the same way (each part alone with its own
adapter) and assembles them with `assemble` below, so the two are compared like for like.

`PartsAnswer` is the streaming side: part 1 streams as it is written, later parts' text is held
back until the parts before them are done, then follows behind its separator.
"""

from __future__ import annotations

from dataclasses import replace

from loraswitch.generate import Generation, TokenLogprob
from loraswitch.numbered import separator, split_parts
from loraswitch.routing.requests import with_result
from loraswitch.switch.request import Done, Failed, Handle, Request, Started, Switched, Token

_DECISION_KEYS = ("adapter", "confidence", "none_probability", "scores", "reason", "source")  # source: trained, examples or zero-shot head


class PartsError(ValueError):
    """A multi-part request that cannot be answered part by part: too many parts, or a `max_tokens`
    too small to give every part a token after the separators (`code` says which). `Switch.run`
    then answers it whole (`routing["not_split"]` says why): a long numbered list is a prompt
    like any other, and no layout makes a request fail."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def part_budget(max_new_tokens: int, n_parts: int, overhead: int = 0) -> int:
    """Each part's first share of new tokens: what is left of the request's budget after
    `overhead` (the separators' tokens), shared equally (`TokenPool` then moves what parts leave
    unused to the others, so the assembled answer never exceeds the budget)."""
    return (max_new_tokens - overhead) // n_parts


class TokenPool:
    """The new tokens a multi-part answer's parts share: `total` (max_tokens less the
    separators), an equal share each to start (the first `total % n` one more). A part that
    ends before its share gives the rest to the parts still writing, in equal shares (the
    earlier parts get the remainder). The rows of one batch write a token a step, so the short
    parts end first and their tokens reach the long ones in time; the limits never sum to more
    than `total`, whatever the order, so the answer stays within max_tokens."""

    def __init__(self, total: int, n_parts: int, waits: dict[int, int] | None = None):
        share, extra = divmod(total, n_parts)
        self.limits = [share + (1 if k < extra else 0) for k in range(n_parts)]
        self.running = set(range(n_parts))
        # a chained part (`waits`: part -> the part it works on) cannot write while it waits, and
        # works only on a whole answer: its share goes to that part, and comes back as what it leaves
        self.waits = dict(waits or {})
        for k, before in sorted(self.waits.items(), reverse=True):
            self.limits[before] += self.limits[k]
            self.limits[k] = 0

    def limit(self, part: int) -> int:
        return self.limits[part]

    def end(self, part: int, used: int) -> None:
        """Part `part` ended after writing `used` tokens: its unused share goes to the others."""
        if part not in self.running:
            return
        self.running.discard(part)
        spare, self.limits[part] = self.limits[part] - used, min(used, self.limits[part])
        # parts that can write now: a chained part still waiting for a running one would hold its
        # tokens idle, so they go to the parts that write (the one it waits for among them)
        writing = sorted(k for k in self.running if self.waits.get(k) not in self.running)
        if spare <= 0 or not writing:
            return
        each, extra = divmod(spare, len(writing))
        for i, k in enumerate(writing):
            self.limits[k] += each + (1 if i < extra else 0)


def pooled_lengths(natural: list[int], ended: list[bool], total: int) -> list[int]:
    """How many tokens each part keeps when the parts decode together as rows of one batch from
    one `TokenPool`, given what each writes with the whole pool to itself: `natural[k]` tokens,
    `ended[k]` when it stopped on its own there (else it would go on). Steps the rows as
    `generate` does, in part order: what `loraswitch eval`'s oracle keeps of its parts, which it
    answers one at a time, so it is measured on the budget `auto`'s rows get."""
    pool, kept, live, step = TokenPool(total, len(natural)), list(natural), list(range(len(natural))), 0
    while live:
        step += 1
        going = []
        for k in live:
            if ended[k] and step > natural[k]:  # it samples its stop token at step natural + 1
                pool.end(k, natural[k])
            elif step >= pool.limit(k) or (not ended[k] and step >= natural[k]):  # its limit (or all it had)
                kept[k] = step
                pool.end(k, step)
            else:
                going.append(k)
        live = going
    return kept


def separators_tokens(tokenizer, n_parts: int) -> int:
    """Tokens the assembly writes between `n_parts` answers ("1. ", "\\n2. ", ...)."""
    return sum(len(separator_ids(tokenizer, k)) for k in range(1, n_parts + 1))


def parts_pool(tokenizer, max_new_tokens: int, n_parts: int) -> int:
    """The new tokens `n_parts` rows share (`TokenPool`) so the assembled answer, separators
    included, stays within `max_new_tokens` (what the oracle of `loraswitch eval` shares too)."""
    return max_new_tokens - separators_tokens(tokenizer, n_parts)


def fan_out(request: Request, base, max_parts: int | None = None, found=None) -> list[Request] | None:
    """One request per part of a multi-part chat request, else None. `found`: the parts
    `switch.segment` detected (a `Segmentation`; fewer than two parts: answer whole); without
    it, the numbered-parts grammar alone. Raises PartsError beyond `max_parts` parts or when
    `max_tokens` leaves a part no token: the request is then answered whole, and its
    `routing.not_split` says why (`switch.rows.request_rows`), numbered or not."""
    if not request.is_chat:
        return None
    if found is not None:
        parts = found.texts if len(found.parts) >= 2 else None
        explicit = found.numbered
    else:
        parts, explicit = split_parts(request.route_text(base)), True
    answered = found.answered if found is not None and parts else parts
    if not parts:
        return None
    n = len(parts)
    kind = "numbered parts" if explicit else "parts"
    if max_parts is not None and n > max_parts:
        raise PartsError(f"the message has {n} {kind}; at most {max_parts} are answered part by part "
                         "(send fewer parts, or several requests)", "too_many_parts")
    pool = parts_pool(base.tokenizer, request.max_tokens, n)
    if part_budget(pool, n) < 1:
        overhead = request.max_tokens - pool
        raise PartsError(f"max_tokens={request.max_tokens} is too small for {n} parts: the separators take "
                         f"{overhead} tokens and each part needs at least one (ask for at least {overhead + n})",
                         "max_tokens_too_small")
    # a part segmentation cut because no adapter fits it is the base model's, not routed again
    # (the selector's fast head, which routes a part first, may read its words as a task)
    base_parts = {k for k, p in enumerate(found.parts) if p.for_base} if found is not None else set()
    base = {"model": "base", "route": None, "allow": None, "deny": ()}
    # a part answered with the request before it in sight is still routed by its own words
    return [replace(request.with_route_text(a), max_tokens=pool, route_as=p if a != p else None,
                    **(base if k in base_parts else {}))
            for k, (p, a) in enumerate(zip(parts, answered))]


def separator_ids(tokenizer, k: int) -> list[int]:
    """Token ids of `separator(k)`: what the assembled answer holds before part k's tokens."""
    return tokenizer(separator(k), add_special_tokens=False)["input_ids"]


def _forced(ids: list[int]) -> list[TokenLogprob]:
    """Separator tokens are written by the assembly, not sampled: probability 1."""
    return [TokenLogprob(t, 0.0) for t in ids]


def assemble(tokenizer, parts: list[Generation], router: str, prompt_ids: list[int] | None = None,
             logprobs: bool = False, found=None) -> Generation:
    """One numbered answer from the parts' answers: text, token ids (separators included, so the
    ids decode to the text), a per-token trace with `part`, a switch event per part and, with
    `logprobs`, the parts' logprobs (separators: 0). Part texts are kept as written (not
    stripped) so a stream of the parts adds up to the answer. `found` (the `Segmentation` the
    parts came from) adds each part's cut points (`span`, characters of the user message), the
    text its row read, and the spans that joined no part (`routing["context"]`)."""
    out = Generation(prompt_ids=list(prompt_ids or []), finish_reason="stop")
    texts: list[str] = []
    for k, part in enumerate(parts, 1):
        sep_ids = separator_ids(tokenizer, k)
        d = part.routing
        out.events.append({"token_index": len(out.token_ids), "event": "switch", "part": k,
                           "adapter": d.get("adapter"), "confidence": round(float(d.get("confidence", 1.0)), 4),
                           **({"reason": d["reason"]} if d.get("reason") else {})})
        for t in sep_ids:
            out.trace.append({"token_id": t, "token": tokenizer.decode([t]), "adapters": {}, "part": k, "separator": True})
        out.trace += [{**e, "part": k} for e in part.trace[: len(part.token_ids)]]
        out.token_ids += sep_ids + part.token_ids
        if logprobs:
            out.logprobs += _forced(sep_ids) + part.logprobs
        texts.append(separator(k) + part.text)
        if part.finish_reason != "stop":
            out.finish_reason = part.finish_reason
    out.text = "".join(texts)
    decisions = [p.routing for p in parts]
    out.routing = {"router": decisions[0].get("router", router) if decisions else router,
                   "adapter": [d.get("adapter") for d in decisions],
                   "confidence": round(min((float(d.get("confidence", 1.0)) for d in decisions), default=1.0), 4),
                   "parts": [{k: d[k] for k in _DECISION_KEYS if k in d} for d in decisions], "fan_out": len(parts)}
    if found is not None and len(found.parts) >= len(parts):  # fewer: a stop string ended the answer early
        for entry, part in zip(out.routing["parts"], found.parts):
            entry.update(part.to_dict())
        out.routing["context"] = [list(span) for span in found.dropped]
    return out


class SingleAnswer:
    """The events of a request answered by one row go to its handle as they are. `not_split`:
    why a prompt of numbered parts was answered whole (too many parts, too few tokens), kept in
    the answer's routing so the caller sees it."""

    def __init__(self, handle: Handle, not_split: str | None = None):
        self.handle = handle
        self.over = False
        self.not_split = not_split

    def limit(self, part: int, asked: int) -> int:
        """The new tokens part `part` may write now (`asked`: its request's max_tokens)."""
        return asked

    def ended(self, part: int, used: int) -> None:
        """Part `part`'s row left the batch after writing `used` tokens."""

    @property
    def gone(self) -> bool:
        return self.over or self.handle.cancelled

    def started(self, part: int, batch: dict) -> None:
        self.handle.emit(Started(batch))

    def event(self, part: int, event: Token | Switched) -> None:
        self.handle.emit(event)

    def done(self, part: int, answer: Generation, batch: dict) -> None:
        self.over = True
        if self.not_split:
            answer.routing = {**answer.routing, "not_split": self.not_split}
        self.handle.emit(Done(answer, batch))

    def failed(self, error: Exception) -> None:
        if not self.over:
            self.over = True
            self.handle.emit(Failed(error))


class PartsAnswer(SingleAnswer):
    """The parent of a multi-part request's rows (see the module doc): streams the parts in order
    behind their separators, renumbering token indices to the assembled answer, and answers once
    every part is done, with `assemble`."""

    def __init__(self, handle: Handle, n_parts: int, tokenizer, router: str, found=None, pool: int | None = None):
        super().__init__(handle)
        self.tokenizer, self.router, self.n, self.found = tokenizer, router, n_parts, found
        waits = {k: p.after for k, p in enumerate(found.parts) if p.chained} if found is not None else {}
        self.pool = TokenPool(pool, n_parts, waits) if pool is not None else None  # None: each part its own max_tokens
        self.sep_ids = [separator_ids(tokenizer, k) for k in range(1, n_parts + 1)]  # as `assemble` writes them
        self.results: list[tuple[Generation, dict] | None] = [None] * n_parts
        self.pending: list[list[Token | Switched]] = [[] for _ in range(n_parts)]  # held back, per part
        self.opened = [False] * n_parts  # the part's separator has been streamed
        self.current = 0  # the part being streamed
        self.offset = 0  # assembled token index where the current part's separator starts
        self.began = False

    def limit(self, part: int, asked: int) -> int:
        return min(asked, self.pool.limit(part)) if self.pool is not None else asked

    def starved(self, part: int) -> bool:
        """Whether part `part` has no token left to write (a chained part whose part before used
        the share it lent it, and every other part's spare)."""
        return self.pool is not None and self.pool.limit(part) < 1

    def answer_of(self, part: int) -> Generation | None:
        """Part `part`'s answer, once it is done."""
        got = self.results[part]
        return got[0] if got is not None else None

    def cut_short(self, part: int) -> None:
        """Chained part `part` is not answered: the answer it works on was cut at max_tokens (a
        sum cut to "4" would be spelled as 4), or left it no token. It ends empty, its
        finish_reason "length", as the answer's."""
        self.ended(part, 0)
        batch = next(r[1] for r in self.results if r is not None)
        self.done(part, Generation([], routing={"reason": "the answer it works on was cut at max_tokens"}), batch)

    def chained(self, part: int, request: Request, before: str) -> Request:
        """Chained part `part`'s request with the answer it works on written into its words
        (`requests.with_result`: "Spell the result in English." -> "Spell 42 in English."), routed
        on them; the answer's routing reports what it read (`Part.read`)."""
        found = self.found.parts[part]
        found.read = with_result(found.text, before)
        return replace(request.with_route_text(found.read), route_as=None)

    def ended(self, part: int, used: int) -> None:
        if self.pool is not None:
            self.pool.end(part, used)

    def started(self, part: int, batch: dict) -> None:
        if not self.began:
            self.began = True
            self.handle.emit(Started({**batch, "fan_out": self.n}))

    def event(self, part: int, event: Token | Switched) -> None:
        if self.over:
            return
        if part == self.current:
            self._stream(part, event)
        else:
            self.pending[part].append(event)

    def _stream(self, k: int, event: Token | Switched) -> None:
        if self.over:
            return
        first = not self.opened[k]
        self.opened[k] = True
        base = self.offset + len(self.sep_ids[k])
        if first:  # the separator, with its own token pieces and (forced) logprobs
            sep = separator(k + 1)
            stop = next((s for s in self.handle.request.stop if s in sep), None)
            if stop is not None:  # the assembled answer ends before it, as at any stop string
                self._answer(k, stop)
                return
            logprobs = tuple(_forced(self.sep_ids[k])) if self.handle.request.logprobs is not None else ()
            self.handle.emit(Token(sep, self.offset, ({"index": self.offset, "text": sep, "adapters": {}, "part": k + 1,
                                                       "separator": True},), logprobs))
        if isinstance(event, Switched):
            self.handle.emit(Switched(base + event.token_index, event.adapter, k + 1))
        elif event.text or event.logprobs:
            pieces = tuple({**p, "index": base + p["index"], "part": k + 1} for p in event.pieces)
            self.handle.emit(Token(event.text, base + event.start, pieces, event.logprobs))

    def done(self, part: int, answer: Generation, batch: dict) -> None:
        if self.over:
            return
        self.results[part] = (answer, batch)
        while not self.over and self.current < self.n and self.results[self.current] is not None:
            stopped = self.results[self.current][0].stop_reason
            if stopped is not None:  # a stop string ends the whole answer, not just its part
                if not self.opened[self.current]:
                    self._stream(self.current, Token("", 0))  # its separator (which may itself stop it)
                if not self.over:
                    self._answer(self.current + 1, stopped)
                return
            self._close_current()
        if self.current == self.n and not self.over:
            self._answer(self.n)

    def _close_current(self) -> None:
        """The streamed part is done: make sure its separator went out, move to the next part and
        flush what that part already wrote."""
        k = self.current
        if not self.opened[k]:
            self._stream(k, Token("", 0))
        self.offset += len(self.sep_ids[k]) + len(self.results[k][0].token_ids)
        self.current += 1
        if self.current < self.n:
            for event in self.pending[self.current]:
                self._stream(self.current, event)
            self.pending[self.current] = []

    def _answer(self, upto: int, stop: str | None = None) -> None:
        """Answer with the first `upto` parts; `stop`: the stop string that ended it there (the
        parts still decoding see the answer gone and leave the batch)."""
        parts = [r[0] for r in self.results[:upto]]
        whole = assemble(self.tokenizer, parts, self.router, list(self.handle.request.prompt_ids or ()),
                         logprobs=self.handle.request.logprobs is not None, found=self.found)
        if stop is not None:
            whole.finish_reason, whole.stop_reason = "stop", stop
        batches = [r[1] for r in self.results if r is not None]
        batch = {**(batches[0] if batches else {}), "fan_out": self.n, "batches": sorted({b.get("id") for b in batches})}
        super().done(0, whole, batch)
