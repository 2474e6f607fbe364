"""Where one task ends and the next begins inside a prompt, found without a format crutch.

TAME's observation applied to text: the onset of a new task shows as a jump in what the router
sees. A prompt is split into candidate units by its own structure (`routing.units`: blocks, list
items, lines, sentences, clauses), every unit of every prompt of a batch is scored by the
sequence selector in one feature pass, and the prompt is cut where the decision changes:

* a unit the selector routes to an adapter with raw confidence >= `min_confidence` is a
  *question*, and so is a request no adapter fits, asked next to another (`__none__` at raw
  probability >= `min_none`, complete in itself and joined to its neighbour as the next
  request: `requests.stands_alone`, `requests.follows_as_next`): "Sort 8, 2, 6, then tell me a
  joke." is two parts, the second answered by the base model (on a line of its own, with no
  connective, only next to a line read as a task, or under a heading: `_Doc.plan`); a unit
  with no word but "and", "plus" and the like, and a line under a request ending with a colon
  (its input), are never questions; anything else (greetings,
  "answer each part", other `__none__` units, low confidence) is *context* and joins a
  neighbour: the part before it, or the part after it when it leads the same line; context on
  lines of its own before the first question is an instruction to the whole prompt and joins
  no part (the row of a part reads its own request only);
* worked examples (`Unit.example`) are context and join no part;
* adjacent prose units of one task stay one part; an enumeration (tagged blocks, list items,
  "a) b)", "first, ...; second, ...") whose items are questions - at least two of them
  confident, or marked in sequence (1..n, a..h, "Q1:") with one when that is half of it - is
  answered item by item, each its own part; an item that only says how to answer ("3. Keep
  each answer short.", `requests.says_how`) is context of the part before it. Any other numbered list is the data of a question ("Which of these
  is sweeter?\n1. apples\n2. pears"): its items are context, and a prompt with no other part
  is answered whole. The lines just above a numbered list of parts introduce it, and a heading
  line (`units.is_heading`) never joins the part before it;
* a cut between two prose parts of different tasks is kept only if the text is *less* like one
  request when read whole than in pieces: the selector's energy (logsumexp of its logits, an
  out-of-distribution score) of the two parts read together must not exceed the larger of their
  own by more than `max_merge_gain`. A request spread over two sentences ("I have a date: March
  5, 2021. Please write it in ISO format.") reads as *more* of a request whole (its second
  sentence alone is an incomplete fragment the selector misroutes); two tasks in one sentence
  read as less of either. With statements kept out of the parts (most such requests open
  with one: "I have a date: ..."), the guard is a backstop: at 4 it also merged two real
  requests whose joint text a high-energy class (to_json) dominates; 8 keeps them apart.

A prompt that yields fewer than two parts is answered exactly as before, untouched. The
settings were tuned on the training layouts of `loraswitch.demo.tasks.freeform` and the demo's
validation prompts only; its held-out layouts are reported apart (docs/routing.md).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from loraswitch.numbered import split_parts
from loraswitch.routing import requests as rq
from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.units import PROSE, Unit, is_heading, is_statement, split_units
from loraswitch.switch.found import Part, Segmentation, finish, join_units
from loraswitch.switch.planning import Settings, plan, question_lines
from loraswitch.switch.screen import screen

_QUOTES = "\"'\u201c\u2018"


@dataclass
class Scores:
    """Per text: the selector's decision (adapter or None), its uncalibrated confidence (softmax
    of the raw logits: a calibrated one is fitted on whole in-suite prompts, and while its
    temperature could sharpen it read 1.0 on almost any fragment) and its energy (logsumexp of
    the logits)."""

    adapter: list[str | None]
    confidence: list[float]
    energy: list[float]
    none: list[float] = field(default_factory=list)  # the raw `__none__` probability (empty: no such class)


def score_texts(router, engine, texts: list[str]) -> Scores | None:
    """The selector's scores for each text, in one feature pass; None when the router has no
    selector (auto fell back to Arrow): then only numbered parts are split."""
    inner = getattr(router, "inner", router)
    if not all(hasattr(inner, a) for a in ("logits", "decide", "layer", "temperature", "classes")):
        return None
    from loraswitch.routing.features import prompt_features

    if not texts:
        return Scores([], [], [])
    with torch.inference_mode():
        feats = prompt_features(engine, texts, inner.layer)
        logits = inner.logits(feats).float()
        claims = None
        if getattr(inner, "added", None):
            claims = inner.added.claims(feats, (feats - inner.mean) / inner.std, engine)
        decisions = inner.decide(torch.softmax(logits / inner.temperature, -1), engine, claims)
        raw = torch.softmax(logits, -1)
        fast = _fast_picks(inner, engine, texts, decisions)
    index = {c: i for i, c in enumerate(inner.classes)}
    conf = [fast[i].confidence if i in fast else float(raw[i, index[d.adapter]]) if d.adapter in index
            else float(d.confidence) if d.adapter else 0.0 for i, d in enumerate(decisions)]
    decisions = [fast.get(i, d) for i, d in enumerate(decisions)]
    none = raw[:, index[NONE_CLASS]].tolist() if NONE_CLASS in index else []
    return Scores([d.adapter for d in decisions], conf, torch.logsumexp(logits, -1).tolist(), none)


FAST_UNIT_SURE = 0.9  # the fast head's confidence from which its pick stands for a unit the main head left


def _fast_picks(inner, engine, texts: list[str], decisions) -> dict:
    """The fast head's confident picks ({index: decision}) for the units the main head sent to
    no adapter: whole prompts are routed by the fast head first (`SequenceRouter.cascade`), and
    on short units the main head abstains on wordings the fast head reads right ("Give me the
    French word for the number 80.": `__none__` 0.95 at layer 15, num_to_french 0.95 at layer
    5; a blind held-out layouts set). Not once the library has grown (the fast head cannot read
    an added adapter's task). The screen's pass kept the fast-layer features of the units it
    read (`features.read_ahead`): for those the picks cost the fast head's logits."""
    fast = getattr(inner, "fast", None)
    rest = [i for i, d in enumerate(decisions) if d.adapter is None]
    if fast is None or not rest or getattr(inner, "added", None):
        return {}
    from loraswitch.routing.features import prompt_features

    picks = fast.route_features(engine, prompt_features(engine, [texts[i] for i in rest], fast.layer))
    return {i: d for i, d in zip(rest, picks) if d.adapter is not None and d.confidence >= FAST_UNIT_SURE}


def _merge(a: Part, b: Part, adapter: str | None) -> Part:
    return Part(sorted(a.units + a.context + b.units), False, adapter, min(a.confidence, b.confidence),
                context=b.context)


@dataclass
class _Doc:
    """One prompt being segmented: its units and their scores (None: not scored)."""

    prompt: str
    units: list[Unit]
    adapter: list[str | None] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)
    energy: list[float] = field(default_factory=list)
    none: list[float] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)

    def may_ask(self) -> list[bool]:
        """The units that, by their words, may be a request no adapter fits asked next to
        another: complete in themselves and joined to a neighbour as the next request (or the
        first after a heading: "## B\nSuggest a name for a cat."). Those alone on a line, with
        no connective, are `on_own_line`."""
        u = self.units
        count = Counter(x.line for x in u)
        headed = [i > 0 and u[i - 1].kind in PROSE and is_heading(u[i - 1].text) and count[u[i].line] == 1
                  for i in range(len(u))]  # the whole line under a heading ("Positive or negative? ..." is not)
        nexts = [i > 0 and (rq.follows_as_next(self.prompt, u[i - 1], u[i]) or headed[i]) for i in range(len(u))]
        return [u[i].kind in PROSE and not u[i].example and (nexts[i] or (i + 1 < len(u) and nexts[i + 1]))
                and rq.stands_alone(u[i].text) for i in range(len(u))]

    def on_own_line(self, own: list[list[int]]) -> list[bool]:
        """The units alone on a line next to another such line (`own`, `own_lines`) that are a
        request complete in itself ("Tell me a joke.\nWhat is 620 + 37?"): `plan` takes them only
        next to a line the selector reads as a task."""
        return [bool(o) and rq.stands_alone(x.text) for o, x in zip(own, self.units)]

    def own_lines(self) -> list[list[int]]:
        """Per unit that is a sentence alone on its line: the units next to it alone on theirs
        (else []). Not a line under one ending with a colon, one opening with a quote, or one
        without an end mark that does not open as a request: what a request shows ("Reverse the
        words:\nsmall birds sing"; "What's the tallest mountain in Africa" typed without one is one)."""
        u = self.units
        count = Counter(x.line for x in u)
        alone = [x.kind in PROSE and count[x.line] == 1 and not x.example for x in u]
        sentence = [a and (x.text[-1:] in ".?!" or rq.opens_as_request(x.text)) and x.text[:1] not in _QUOTES
                    and not (i and u[i - 1].text.endswith(":")) for i, (a, x) in enumerate(zip(alone, u))]
        return [[j for j in (i - 1, i + 1) if 0 <= j < len(u) and alone[j]] if sentence[i] else []
                for i in range(len(u))]

    def may_chain(self) -> list[bool]:
        """The units that work on the answer of the request before them ("Then spell the result
        in English."), asked next or right after it (`requests.works_on`), or the next item of its
        list ("- Spell the result in English."): a part of their own even where the same adapter
        answers both ("Add 5 and 9, then add 10 to the result.")."""
        u = self.units
        return [i > 0 and not u[i].example and (
            (u[i].kind in PROSE and rq.works_on(self.prompt, u[i - 1], u[i]))
            or (u[i].list_id >= 0 and u[i].list_id == u[i - 1].list_id and rq.names_result(u[i].text)))  # the next item
            for i in range(len(u))]

    def plan(self, settings: Settings) -> None:
        """Parts from the scored units (`plan`). A request no adapter fits on a line of its own,
        with no connective, is one only next to a line read as a task ("Tell me a joke.\nWhat is
        620 + 37?"): lines of greetings and thanks around requests are not ("Good morning, some
        quick ones for you."). Nor is a question whose line goes on with a statement: that is its
        input ("... \u2013 Positive or negative? The battery died after a week.", read together)."""
        u = self.units
        task = [a is not None and c >= settings.min_confidence and not is_statement(x.text)
                for a, c, x in zip(self.adapter, self.confidence, u)]
        own = self.own_lines()
        beside_task = [any(task[j] for j in o) for o in own]
        by_words = self.may_ask()
        by_line = [m and t for m, t in zip(self.on_own_line(own), beside_task)]
        has_input = [u[i].text.endswith("?") and i + 1 < len(u) and u[i + 1].line == u[i].line
                     and u[i + 1].kind in PROSE and is_statement(u[i + 1].text) for i in range(len(u))]
        asked = [(w or b) and n >= settings.min_none and not i
                 for w, b, n, i in zip(by_words, by_line, self.none or [0.0] * len(u), has_input)]
        # a line next to a task's line that opens as a request and says what on is one, whatever the
        # selector reads in it ("Convert title=Dune, year=1965 to JSON.\nSort 40, 10, 30." lost the
        # JSON request: read under the threshold, a line before the first question was an instruction)
        # ... and so is an item of a list with an item read as a task ("- What's 7 + 8?\n- What
        # does 'ubiquitous' mean?": a list of one task's item and an open request)
        tasks_in = Counter(x.list_id for x, t in zip(u, task) if t and x.list_id >= 0)
        listed = [x.list_id >= 0 and not x.example and tasks_in[x.list_id] > 0 for x in u]
        weak = [not t and (b or i) and rq.asks_on_its_own(x.text) for t, b, i, x in zip(task, beside_task, listed, u)]
        asked = [a or w for a, w in zip(asked, weak)]
        self.parts, self.dropped = plan(self.units, self.adapter, self.confidence, settings, asked, self.may_chain())

    def runs(self) -> list[list[int]]:
        """Runs of two or more adjacent context units of prose on one paragraph: a request whose
        instruction and input sit in separate sentences ("Positive or negative? The kettle
        broke.") is a question only read together."""
        inside = {i for p in self.parts for i in p.units}
        out, run = [], []
        for i, u in enumerate(self.units):
            free = i not in inside and not u.example and u.kind != "block" and u.kind != "item"
            if free and run and self.units[run[-1]].para == u.para:
                run.append(i)
                continue
            if len(run) > 1:
                out.append(run)
            run = [i] if free else []
        return out + ([run] if len(run) > 1 else [])

    def fuse(self, run: list[int], adapter: str | None, confidence: float, energy: float, none: float) -> None:
        """Make the units of `run` one unit with the given scores."""
        a, b = self.units[run[0]], self.units[run[-1]]
        fused = Unit(a.start, b.end, join_units(self.prompt, [self.units[i] for i in run]), "sentence", line=a.line,
                     para=a.para)
        lo, hi = run[0], run[-1] + 1
        self.units[lo:hi] = [fused]
        self.adapter[lo:hi], self.confidence[lo:hi], self.energy[lo:hi] = [adapter], [confidence], [energy]
        if self.none:
            self.none[lo:hi] = [none]


def segment(router, engine, prompts: list[str], settings: Settings = Settings(),
            selector_next: bool = False) -> list[Segmentation]:
    """The parts of each prompt (fewer than two: answer it whole). The prompts `screen` passes on
    have every unit scored in one feature pass; runs of context units that may be one request
    together, and the prose cuts that pass the decision test, are scored in one more pass each
    (only where there are any). `selector_next`: the selector routes these prompts right after
    (`auto`), so the screen reads them whole in its pass too."""
    docs = [_Doc(p, split_units(p)) for p in prompts]
    ahead = [rq.without_how(p) for p in prompts] if selector_next else ()  # what `auto` routes them on
    read = screen(router, engine, [d.units for d in docs], ahead,
                  [any(d.may_ask()) or any(d.on_own_line(d.own_lines())) or any(d.may_chain())
                   or bool(question_lines(d.units)) for d in docs])
    live = [d for d, r in zip(docs, read) if r]
    todo = [(d, i) for d in live for i, u in enumerate(d.units) if not u.example]
    scores = score_texts(router, engine, [d.units[i].text for d, i in todo])
    if scores is None:
        return [_numbered(p) for p in prompts]
    for d in live:
        n = len(d.units)
        d.adapter, d.confidence, d.energy, d.none = [None] * n, [0.0] * n, [0.0] * n, [0.0] * n
    nones = scores.none or [0.0] * len(todo)
    for (d, i), a, c, e, n in zip(todo, scores.adapter, scores.confidence, scores.energy, nones):
        d.adapter[i], d.confidence[i], d.energy[i], d.none[i] = a, c, e, n
    for d in live:
        d.plan(settings)
    _rescue(router, engine, live, settings)
    _check_cuts(router, engine, live, settings)
    return [finish(d.prompt, d.units, d.parts, d.dropped) for d in docs]


def _rescue(router, engine, docs: list[_Doc], settings: Settings) -> None:
    """Score each run of context units read together; a confident one becomes one unit. A prompt
    with no part and one run is skipped: fused, the run is its only question, so it stays whole
    whatever the score (a one-task request in several sentences: "Positive or negative? The
    kettle broke. One star."); scoring it was a feature pass for nothing."""
    runs = [(d, r) for d in docs if len(d.units) > 1 for found in [d.runs()] if d.parts or len(found) > 1
            for r in found]
    if not runs:
        return
    s = score_texts(router, engine, [join_units(d.prompt, [d.units[i] for i in r]) for d, r in runs])
    touched = []
    nones = s.none or [0.0] * len(runs)
    for (d, r), a, c, e, n in sorted(zip(runs, s.adapter, s.confidence, s.energy, nones), key=lambda x: -x[0][1][0]):
        if a is not None and c >= settings.min_confidence:
            d.fuse(r, a, c, e, n)
            touched.append(d)
    for d in {id(d): d for d in touched}.values():
        d.plan(settings)


def _check_cuts(router, engine, docs: list[_Doc], settings: Settings) -> None:
    """Merge adjacent prose parts whose text reads more like one request whole than apart."""
    pairs = []
    for d in docs:
        chains = d.may_chain()
        for j in range(len(d.parts) - 1):
            a, b = d.parts[j], d.parts[j + 1]
            if not a.firm and not b.firm and a.adapter != b.adapter and not chains[b.units[0]]:
                pairs.append((d, j, join_units(d.prompt, [d.units[i] for i in sorted(a.units + a.context + b.units)])))
    if not pairs:
        return
    merged = score_texts(router, engine, [t for _, _, t in pairs])
    for (d, j, _), e, name in sorted(zip(pairs, merged.energy, merged.adapter), key=lambda x: -x[0][1]):
        a, b = d.parts[j], d.parts[j + 1]
        gain = e - max(max(d.energy[i] for i in a.units), max(d.energy[i] for i in b.units))
        if gain > settings.max_merge_gain:
            d.parts[j : j + 2] = [_merge(a, b, name)]


def _numbered(prompt: str) -> Segmentation:
    """Without a selector: the numbered-parts grammar alone, as before (no spans)."""
    found = split_parts(prompt) or []
    return Segmentation([Part([], True, None, 1.0, text=t, kind="numbered") for t in found], [])


def segment_requests(switch, handles) -> dict[int, Segmentation]:
    """The segmentation of every request `auto` answers part by part (chat, model "auto", a
    router that fans out), keyed by `id(handle)`: all prompts of the batch in one pass per
    router. A request whose router cannot be built is left out (building its policy reports
    why; the numbered grammar still applies)."""
    groups: dict[str | None, tuple[object, list]] = {}
    for h in handles:
        req = h.request
        if req.model != "auto" or not req.is_chat:
            continue
        try:
            router = switch.router(req.route or "auto")
        except Exception:
            continue
        if getattr(router, "fans_out", False):
            groups.setdefault(req.route, (router, []))[1].append(h)
    out: dict[int, Segmentation] = {}
    for router, members in groups.values():
        found = segment(router, switch.engine, [h.request.route_text(switch.base) for h in members],
                        selector_next=True)
        out.update({id(h): f for h, f in zip(members, found)})
    return out
