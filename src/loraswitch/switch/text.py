"""Turning a row's tokens into text as they arrive: incremental detokenization and stop strings.

Decoding the whole answer again after every token costs O(n^2); `Detokenizer` decodes only a
short window (the technique of text-generation-inference and vLLM) and holds back a character
whose UTF-8 bytes are not all there yet. `StopStrings` finds the first stop string in the text
without rescanning it, and says how much of the tail must wait because a stop string may be
starting there (a stream must never show text that a stop string will cut).
"""

from __future__ import annotations


class Detokenizer:
    """Text of a growing token sequence; `ends[i]` is where token i's text ends in `text`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.ends: list[int] = []
        self._prefix = 0  # the window starts here (its text is context, already in `text`)
        self._read = 0  # tokens before this are in `text`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; returns the text it completes ("" while a character is unfinished)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        new = ""
        if len(now) > len(before) and not now.endswith("\ufffd"):
            new = now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        self.ends.append(len(self.text))
        return new

    def complete(self, upto: int) -> int:
        """How many tokens have all of their text within `text[:upto]`."""
        n = 0
        while n < len(self.ends) and self.ends[n] <= upto:
            n += 1
        return n

    def pieces(self, text: str, a: int, b: int, entries: list[dict], first: int = 0) -> tuple[list[dict], int]:
        """`text[a:b]` (this text, or the final answer it grew into) cut at token boundaries, each
        piece with its token's `index` and routing `entries[index]`, scanning from token `first`;
        also returns where the next call starts (the token whose text reaches past `b`). The last
        token takes any tail beyond its end."""
        out, i, n = [], first, len(self.ends)
        while i < n:
            lo = self.ends[i - 1] if i > 0 else 0
            hi = self.ends[i] if i < n - 1 else max(self.ends[i], b)
            if lo >= b:
                break
            s, e = max(lo, a), min(hi, b)
            if e > s:
                extra = {k: v for k, v in entries[i].items() if k not in ("token_id", "token", "adapters")}
                out.append({"index": i, "text": text[s:e], "adapters": entries[i].get("adapters", {}),
                            **extra})
            if hi > b:
                break
            i += 1
        return out, i


class StopStrings:
    """The first occurrence of any stop string, found incrementally."""

    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self._scanned = 0  # text before this holds no stop string start that could still match
        self.hit: str | None = None  # the stop string `find` found (the first to start; the longest there)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str) -> int | None:
        """Where the first stop string in `text` starts, or None; call with the text as it grows."""
        start = max(0, self._scanned - self.longest + 1)
        hits = [(p, -len(s), s) for s in self.stops if (p := text.find(s, start)) >= 0]
        self._scanned = len(text)
        if not hits:
            return None
        at, _, self.hit = min(hits)
        return at

    def holdback(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
