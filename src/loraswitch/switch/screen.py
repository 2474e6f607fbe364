"""Which prompts segmentation reads unit by unit at the selector's main layer (`screen`): most
prompts of several sentences ask one thing, and the fast head can tell so in a pass a third as
deep (issue 17: reading every unit at the main layer was `auto`'s largest fixed cost at 8
requests). `switch.segment` reads the rest."""

from __future__ import annotations

import torch

from loraswitch.routing.base import NONE_CLASS
from loraswitch.routing.units import PROSE, Unit

PLAUSIBLE = 0.01  # the fast head's raw probability above which an adapter is a unit's possible task


def screen(router, engine, docs: list[list[Unit]], ahead: list[str] = (), asks: list[bool] | None = None,
           ) -> list[bool]:
    """Which prompts (given as their units) the main head must read unit by unit. Most prompts
    of several sentences ask one thing ("Positive or negative? The kettle broke. One star."),
    and reading their units at the main layer was `auto`'s largest fixed cost at 8 requests
    (issue 17). So the selector's fast head reads the units of every prose prompt first, in a
    pass a third as deep, and a prompt goes on only when two of its units are read as plausibly
    different tasks (adapter A in one, B in another, raw probability >= `PLAUSIBLE` each): its
    parts are of different tasks (parts of one task are one part), each from a unit of its own.
    Lists, blocks and worked examples always go on (their items are parts by layout), and so
    does every prompt when there is no fast head or the library has grown (the fast head cannot
    read an added adapter's task). On the demo's 126 prose composites of the test and
    validation layouts every one goes on up to a threshold of 0.4; at 0.01, 59 of its 72
    single-task prompts of several units do not (docs/routing.md). A prompt with a unit that may
    be a request no adapter fits (`asks`, `_Doc.may_ask`) goes on where one of its units is read
    as plausibly a task. `ahead`: texts the selector reads at the fast layer next (the batch's
    whole prompts), read in the same pass (`features.read_ahead`)."""
    want = [len(units) > 1 for units in docs]
    inner = getattr(router, "inner", router)
    fast = getattr(inner, "fast", None)
    if fast is None or getattr(inner, "added", None):
        return want
    prose = [w and all(u.kind in PROSE and u.list_id < 0 and not u.example for u in units)
             for units, w in zip(docs, want)]
    texts = [(k, u.text) for k, units in enumerate(docs) if prose[k] for u in units]
    if not texts and not ahead:
        return want
    from loraswitch.routing.features import read_ahead

    with torch.inference_mode():
        feats = read_ahead(engine, [t for _, t in texts], fast.layer, list(ahead))
        probs = torch.softmax(fast.logits(feats).float(), -1) if texts else []
    adapters = [i for i, c in enumerate(fast.classes) if c != NONE_CLASS]
    reads: dict[int, list[frozenset[int]]] = {}
    for (k, _), row in zip(texts, probs):
        plausible = frozenset(i for i in adapters if float(row[i]) >= PLAUSIBLE)
        if plausible:
            reads.setdefault(k, []).append(plausible)
    asks = asks or [False] * len(docs)
    return [w and (not prose[k] or _two_tasks(reads.get(k, [])) or (asks[k] and bool(reads.get(k))))
            for k, w in enumerate(want)]


def _two_tasks(reads: list[frozenset[int]]) -> bool:
    """Whether two of these units' plausible tasks differ: A in one unit, B != A in another."""
    return len(reads) >= 2 and not (len(set(reads)) == 1 and len(reads[0]) == 1)
