"""Segment-held gating (issue 13, item 4): the learned gates read the prompt token by token, but
the answer is written with ONE adapter in every layer per part of it.

Read token by token, the per-layer gates disagree: the layers of one token pick different
adapters and the token gets a mixture no adapter was trained for (59% on the demo's single
tasks where the oracle has 90%). Read over a span of the prompt they mostly agree. So:

1. reading (`TokenRouter.read`, in `start`): one forward over the prompts in which every layer
   routes every token itself, as MeteoRA's gates do; no cache is kept. Each token's votes, summed
   over layers, are averaged over a window, the argmax cut into runs, runs shorter than a few
   tokens absorbed by their neighbours, and a line the runs would split labelled as a whole
   (`segment`). The adapter runs, in order, are the `plan`: [A] for a single task, [A, B, C]
   for three parts; "no adapter" runs are context. A prompt that asks its questions as tagged
   or bracketed blocks (`units.question_blocks`: MeteoRA's `[INST] ... [/INST]` composites,
   after worked examples that carry their answers) is planned by its structure instead: one
   part per question block, each read alone (`SegmentPolicy._read_alone`), everything else
   context (`block_labels`).
2. the one generation over the whole prompt (one KV cache) routes statically: each user token to
   its run's adapter in every layer (context to the part it introduces; the chat preamble and the
   template tail to the plan's first adapter), then each answer token to the adapter of the part
   being written, moving on where the answer starts its next part (a line numbered k, or a new
   line: `answer_part`).

Why a separate reading forward: the held adapter answers from the prompt's cache, and a cache
written under per-token mixtures is not what it was trained on (routed right, `add` scored 20%
against the oracle's 100% in a one-forward version). Nor can the gates read a prompt that is
already routed by their runs: they were trained on inputs teacher-forced with the right adapter,
so whichever adapter an early layer applies, the later layers vote for it.

No temperature is set by hand; the window and the shortest run are counts of prompt tokens.
"""

from __future__ import annotations

import torch

from loraswitch.engine import Engine
from loraswitch.generate import NO_ADAPTER, Choice
from loraswitch.numbered import numbered_lines
from loraswitch.routing.cues import PartCues, list_item
from loraswitch.routing.token import TokenPolicy, TokenRouter
from loraswitch.routing.units import question_blocks

WINDOW = 7  # prompt tokens each token's mass is averaged over before its argmax
MIN_RUN = 5  # a run of fewer prompt tokens is absorbed by its neighbours


def smoothed_labels(mass: torch.Tensor, window: int = WINDOW) -> list[int]:
    """Per-token argmax (0 = no adapter, k = slot k - 1) of the mass [T, n] averaged over a
    centred window; the window shrinks at the ends instead of padding with zeros."""
    if mass.shape[0] == 0:
        return []
    m = mass.float().T[None]  # [1, n, T]
    w = max(1, min(window, mass.shape[0]))
    kernel = torch.ones(m.shape[1], 1, w) / w
    summed = torch.nn.functional.conv1d(m, kernel, padding=w // 2, groups=m.shape[1])[0, :, : mass.shape[0]]
    counts = torch.nn.functional.conv1d(torch.ones(1, 1, mass.shape[0]), torch.ones(1, 1, w) / w,
                                        padding=w // 2)[0, 0, : mass.shape[0]]
    return (summed / counts).argmax(0).tolist()


def runs(labels: list[int], min_run: int = MIN_RUN) -> list[tuple[int, int, int]]:
    """(label, start, end) of each maximal span of one label, after the shortest run under
    `min_run` tokens is, again and again, relabelled as its longer neighbour (ties: the one
    before) and merged, until none is left or one run remains."""
    out: list[list[int]] = []
    for i, lab in enumerate(labels):
        if out and out[-1][0] == lab:
            out[-1][2] = i + 1
        else:
            out.append([lab, i, i + 1])
    while len(out) > 1:
        k = min(range(len(out)), key=lambda j: out[j][2] - out[j][1])
        if out[k][2] - out[k][1] >= min_run:
            break
        before = out[k - 1] if k > 0 else None
        after = out[k + 1] if k + 1 < len(out) else None
        size = lambda r: -1 if r is None else r[2] - r[1]  # noqa: E731
        into = before if size(before) >= size(after) else after
        into[1], into[2] = min(into[1], out[k][1]), max(into[2], out[k][2])
        del out[k]
        merged: list[list[int]] = []
        for r in out:
            if merged and merged[-1][0] == r[0]:
                merged[-1][2] = r[2]
            else:
                merged.append(r)
        out = merged
    return [tuple(r) for r in out]  # type: ignore[misc]


def read_runs(mass: torch.Tensor, window: int = WINDOW, min_run: int = MIN_RUN,
              line_starts: list[int] | None = None) -> list[tuple[int, int, int]]:
    """The runs (label, start, end) of a user-word mass [T, n] (`segment` says how)."""
    found = runs(smoothed_labels(mass, window), min_run)
    if line_starts is not None:
        found = runs(_by_line([r[0] for r in found for _ in range(r[2] - r[1])], mass, line_starts), 1)
    return found


def plan_spans(found: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(adapter label, start, end) per entry of the plan: the adapter's own runs, without the
    context that leads into them; a repeat that only context separated is one entry."""
    out: list[tuple[int, int, int]] = []
    for lab, start, end in found:
        if lab == 0:
            continue
        if out and out[-1][0] == lab:
            out[-1] = (lab, out[-1][1], end)
        else:
            out.append((lab, start, end))
    return out


def segment(mass: torch.Tensor, window: int = WINDOW, min_run: int = MIN_RUN,
            line_starts: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(a label per token, the plan) of a user-word mass [T, n]; labels are gate columns (0 = no
    adapter, k = slot k - 1). The plan is the adapter runs in order (a repeat that only context
    separated counts once): [] when every run is "no adapter". Each token is labelled with its
    run's adapter; a context run takes the adapter of the run after it (an instruction leads into
    the part it introduces), or of the last run when none follows.

    With `line_starts` (token indices that begin a line) runs change only between lines: a line
    the runs would split is labelled as a whole by its summed votes. The gates read causally, so
    the start of a request is often read as another task until its last words say which (a
    BIG-bench question that ends "How many vegetables do I have?")."""
    return label_runs(read_runs(mass, window, min_run, line_starts), mass.shape[0])


def label_runs(found: list[tuple[int, int, int]], n: int) -> tuple[list[int], list[int]]:
    """`segment`'s (a label per token, the plan) from the runs of `n` tokens."""
    adapters = [r for r in found if r[0] > 0]
    if not adapters:
        return [0] * n, []
    labels: list[int] = []
    order: list[int] = []
    for i, (lab, start, end) in enumerate(found):
        if lab > 0 and (not order or order[-1] != lab):
            order.append(lab)
        if lab == 0:
            lab = next((r[0] for r in found[i + 1 :] if r[0] > 0), adapters[-1][0])
        labels += [lab] * (end - start)
    return labels, order


def _by_line(labels: list[int], mass: torch.Tensor, line_starts: list[int]) -> list[int]:
    """`labels` with every line that holds an adapter label relabelled as a whole by its votes
    for adapters (its "no adapter" stretches are context of the same line), each token's vote
    weighted by its place in the line (1, 2, ... n): the gates read causally, so a token has read
    more of its line the later it comes. A line of "no adapter" only stays context.

    Weighted so, the demo's validation prompts were all read right (160 of 160 single-task
    prompts; 157 with plain sums: "Spell the number 347 in English." leans French until its
    last words) and no composite plan got worse (28 of 30 composite-3 parts in place, as with
    plain sums; composite-5 35 -> 37 of 50)."""
    bounds = sorted({0, len(labels), *(i for i in line_starts if 0 < i < len(labels))})
    out = list(labels)
    for a, b in zip(bounds, bounds[1:]):
        if any(out[a:b]):
            out[a:b] = [span_vote(mass, a, b)] * (b - a)
    return out


def span_vote(mass: torch.Tensor, a: int, b: int) -> int:
    """The adapter label (k >= 1) tokens a..b-1 of a reading vote for together, each token's
    vote weighted by its place in the span (1, 2, ... n): the gates read causally, so a later
    token has read more of the span (`_by_line`)."""
    weight = torch.arange(1, b - a + 1, dtype=torch.float)[:, None]
    return int((mass[a:b, 1:].float() * weight).sum(0).argmax()) + 1


def question_label(mass: torch.Tensor) -> int:
    """The label (0 = no adapter) of a question from its own reading [T, n]: its weighted votes
    (`span_vote`), or 0 when no token of it is read as an adapter."""
    return span_vote(mass, 0, mass.shape[0]) if any(smoothed_labels(mass)) else 0


def block_labels(n: int, spans: list[tuple[int, int]], order: list[int]) -> list[int]:
    """A label per token of `n` user tokens whose questions are the token spans `spans`, read as
    `order`: a question's tokens take its label; every other token (the instruction, worked
    examples, "answer these") is context and takes the label of the question after it, or of
    the last one."""
    labels, k = [], 0
    for i in range(n):
        while k + 1 < len(spans) and i >= spans[k][1]:
            k += 1
        labels.append(order[k])
    return labels


def answer_part(text: str) -> int:
    """Which part (0-based) of a multi-part answer `text` is writing now: the number of the last
    numbered line ("2. ..." -> 1) once the answer numbers its lines, else how many non-empty lines
    it has finished."""
    lines = text.split("\n")
    found = numbered_lines(text)
    if found:
        return max(0, found[-1][0] - 1)
    return sum(1 for line in lines[:-1] if line.strip())


class SegmentPolicy(TokenPolicy):
    """`start` reads the prompts with the gates (`TokenRouter.read`: a forward in which every
    layer routes every token itself, no cache kept) and cuts each into runs (`segment`). The one
    generation over the whole prompt then routes statically: each prompt token to its run's
    adapter in every layer (the chat preamble and the template tail to the plan's first), each
    answer part to the plan's next adapter (module docstring)."""

    def __init__(self, router: TokenRouter, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None,
                 cues: bool = True):
        super().__init__(router, engine, allowed)
        self.cues = PartCues(engine.base) if cues else None  # go on past each part's end (`routing.cues`)
        self.allowed_names = allowed
        base = engine.base
        self.prompts = prompts
        self.n_user = [len(base.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        # the chat template's tokens after the user's words ("<|im_end|>\n<|im_start|>assistant\n")
        self.tail = len(base.chat_ids("A")) - base.user_start - len(base.tokenizer("A", add_special_tokens=False)["input_ids"])
        self.prompt_slots: list[torch.Tensor] = []  # per row: each prompt token's slot
        self.plans: list[list[int]] = []  # per row: slots in answer order (-1 = no adapter)
        self.dynamic = None  # the layers do not decide: the plan does

    def start(self, engine: Engine, prompts: list[list[int]]) -> None:
        reads = self.router.read(engine, prompts, self.allowed_names)
        blocks = [self._question_spans(row, self._user(ids, mass, row).shape[0])
                  for row, (ids, mass) in enumerate(zip(prompts, reads))]
        alone = iter(self._read_alone(engine, [text for found in blocks for _, text in found]))
        for row, mass in enumerate(reads):
            own = [next(alone) for _ in blocks[row]]
            slots, plan, asks = self._plan(engine, prompts[row], mass, row, blocks[row], own)
            self.prompt_slots.append(slots)
            self.plans.append(plan)
            if self.cues is not None:
                self.cues.add(asks)

    def _user(self, ids: list[int], mass: torch.Tensor | None, row: int) -> torch.Tensor:
        """The reading of the user's words of prompt `row` (they end where the template tail starts)."""
        end = len(ids) - self.tail
        return mass[max(0, end - self.n_user[row]) : end] if mass is not None else torch.zeros(0, 1)

    def _read_alone(self, engine: Engine, questions: list[str]) -> list[int]:
        """The label of each question block read as a prompt of its own, in one reading forward.
        Read where the prompt asks it, a question is read after the worked examples and the
        questions before it, and the gates, reading causally, carry those over (strategyqa's
        question read as question_selection after a question_selection block): the BIG-bench
        gates put 6 of 9 composite-3 parts and 12 of 15 composite-5 parts in place read so,
        8 and 14 read alone (`scripts/gate_reading.py --library bigbench`). The cue asks each
        question alone too (`routing.cues`)."""
        if not questions:
            return []
        ids = [engine.base.chat_ids(q) for q in questions]
        reads = self.router.read(engine, ids, self.allowed_names)
        n = [len(engine.base.tokenizer(q, add_special_tokens=False)["input_ids"]) for q in questions]
        return [question_label(m[len(i) - self.tail - k : len(i) - self.tail]) for i, m, k in zip(ids, reads, n)]

    def _plan(self, engine: Engine, ids: list[int], mass: torch.Tensor | None, row: int,
              blocks: list[tuple[tuple[int, int], str]], own: list[int]) -> tuple[torch.Tensor, list[int], list[str | None]]:
        """(each prompt token's slot, the plan as slots, the request each part's cue asks) of one
        prompt from its reading: one part per question block, read alone (`own`), when it asks
        them so (`_question_spans`), else runs between lines (`segment`)."""
        n, end = len(ids), len(ids) - self.tail
        user = self._user(ids, mass, row)
        words = ids[end - user.shape[0] : end]
        if blocks:
            order, asks = own, [text for _, text in blocks]
            labels = block_labels(user.shape[0], [span for span, _ in blocks], order)
        else:
            pieces = engine.base.tokenizer.batch_decode([[t] for t in words])
            found = read_runs(user, line_starts=[i + 1 for i, piece in enumerate(pieces) if "\n" in piece])
            labels, order = label_runs(found, user.shape[0])
            asks = [list_item(engine.base.tokenizer.decode(words[a:b])) for _, a, b in plan_spans(found)]
        if not order:  # no adapter run: the sequence-level decision over the same tokens
            d = self.router._decision(engine, user.mean(0) if user.shape[0] else None)
            order = [engine.slots[d.adapter] + 1 if d.adapter else 0]
            labels = order * user.shape[0]
        slots = torch.full((n,), order[0] - 1, dtype=torch.long)
        slots[end - len(labels) : end] = torch.tensor(labels, dtype=torch.long) - 1
        return slots, [lab - 1 for lab in order], asks

    def _question_spans(self, row: int, n_read: int) -> list[tuple[tuple[int, int], str]]:
        """(its user-token span, its words) per question block of prompt `row`
        (`units.question_blocks`); [] when it has none, or when the reading did not cover the
        prompt's words as they tokenize alone (their offsets would not be its tokens)."""
        prompt = self.prompts[row]
        blocks = question_blocks(prompt)
        if not blocks:
            return []
        offsets = self.engine.base.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) != n_read:
            return []
        out = []
        for u in blocks:
            inside = [i for i, (a, b) in enumerate(offsets) if b > u.start and a < u.end]
            out.append(((inside[0], inside[-1] + 1), u.text))
        return out

    def prompt_choice(self, row: int, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.prompt_slots[row][:, None]
        return slots, torch.ones(slots.shape)

    def step_choice(self, row: int, generated: list[int]) -> Choice:
        """The plan's adapter for the answer part being written (the last one past the plan):
        the part the cues began, else the one the answer's own lines say."""
        steps = self.plans[row]
        part = self.cues.current(row) if self.cues is not None else None
        if part is None:
            part = answer_part(self.engine.base.tokenizer.decode(generated, skip_special_tokens=True))
        slot = steps[min(part, len(steps) - 1)]
        return NO_ADAPTER if slot < 0 else ([slot], [1.0])

    def feed(self, row: int, generated: list[int], token: int, stops: bool) -> tuple[int, bool]:
        return (token, True) if self.cues is None else self.cues.feed(row, generated, token, stops)

    def extra_steps(self) -> int:
        return 0 if self.cues is None else self.cues.extra_steps()

    def trace_entry(self, engine: Engine, row: int, choice: Choice) -> dict:
        """The adapter that produced the token (every layer the same), kept for `events`."""
        adapters = {engine.name_of(s) or f"slot{s}": 1.0 for s in choice[0] if s >= 0}
        self.traces.setdefault(row, []).append(adapters)
        return {"adapters": adapters}

    def summary(self, engine: Engine, row: int) -> dict:
        names = [engine.name_of(s) if s >= 0 else None for s in self.plans[row]] if row < len(self.plans) else []
        out = {**super().summary(engine, row), "plan": names}
        if self.cues is not None and row < len(self.cues.fed) and self.cues.cues[row]:
            out["cue_tokens"] = self.cues.fed[row]  # read in the pass, not in the answer (`routing.cues`)
        return out
