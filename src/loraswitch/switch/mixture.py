"""Adapters composed on request: `model="iso_date:0.7+to_json:0.3"` (or, on the server, the
`loraswitch.adapters` object) answers with a fixed weighted mixture of adapters, and `auto` may be
told which adapters it may choose (`allow`) or must not (`deny`).

A mixture is no new mechanism: every token of the request uses the same slots with the same
weights, the per-token weighted routing the kernels already compute exactly
(`y = W x + sum_e w_e s_e B_e A_e x`), so it costs one forward and equals the base with the
weighted deltas merged in. Weights are used as given (not normalized: `a:0.5` is half of `a`),
must be finite, not negative and at most `MAX_WEIGHT`; a name may appear once.

The model string is parsed here and only here: `Switch.resolve` (the library) and the server both
call `parse_model`, so the two accept and refuse exactly the same strings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from loraswitch.generate import Choice, FixedPolicy
from loraswitch.library import MAX_SCALE, AdapterError

RESERVED = ("auto", "base")
# a weight multiplies an adapter's scale, which loading caps at MAX_SCALE; past this the update
# swamps the base weights (the answer overflows or is noise), so it is refused, not served
MAX_WEIGHT = 100.0


class MixtureError(ValueError):
    """A mixture or an allow / deny list that cannot be served as written (`code` says why)."""

    def __init__(self, message: str, code: str = "invalid_mixture"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Mixture:
    """Adapters and their weights, in the order written."""

    weights: tuple[tuple[str, float], ...]

    @property
    def spec(self) -> str:
        """The canonical model string ("a:0.7+b:0.3"): what a request carries as its `model`."""
        return "+".join(f"{name}:{_written(weight)}" for name, weight in self.weights)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.weights]

    def choice(self, engine) -> Choice:
        return [engine.slot_of(n) for n in self.names], [w for _, w in self.weights]


def _written(weight: float) -> str:
    """A weight as plain decimals that read back to the same float: no exponent (its "+" would
    split the term) and no rounding (weights are used as written)."""
    text = format(Decimal(repr(weight)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


# a weight as written in a model string: ASCII decimals (Python's float also reads "1_0", "１" and
# Arabic-Indic digits, which a client would not mean), or nan / inf to be refused by name
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.ASCII | re.IGNORECASE)


def _weight(text: str, term: str) -> float:
    if not _NUMBER.fullmatch(text):
        raise MixtureError(f"the weight of {term!r} is not a number (write name:weight, e.g. iso_date:0.7)")
    return float(text) + 0.0  # -0 is 0


def _looks_weighted(text: str) -> bool:
    """Whether the part after the ':' of a one-term model string was meant as a weight ("", "0x10",
    "+1", ".5"): then a malformed one is a mixture error, not an unknown adapter or router."""
    return not text or text[0] in "+-." or text[0].isdigit() or bool(_NUMBER.fullmatch(text))


def mixture_of(adapters: Mapping[str, float] | Iterable[tuple[str, float]]) -> Mixture:
    """A validated mixture from {name: weight} (the server's `loraswitch.adapters`) or pairs."""
    pairs = list(adapters.items() if isinstance(adapters, Mapping) else adapters)
    if not pairs:
        raise MixtureError("a mixture needs at least one adapter")
    seen: set[str] = set()
    for name, weight in pairs:
        if not isinstance(name, str) or not name:
            raise MixtureError("adapter names in a mixture must be non-empty strings")
        if name in RESERVED:
            raise MixtureError(f"{name!r} cannot be part of a mixture (mix adapters; 'base' is weight 0)")
        if name in seen:
            raise MixtureError(f"{name!r} appears twice in the mixture")
        seen.add(name)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise MixtureError(f"the weight of {name!r} must be a number")
        if not math.isfinite(weight):
            raise MixtureError(f"the weight of {name!r} is {weight}; weights must be finite")
        if weight < 0:
            raise MixtureError(f"the weight of {name!r} is {weight:g}; weights must not be negative")
        if weight > MAX_WEIGHT:
            raise MixtureError(f"the weight of {name!r} is {weight:g}; weights above {MAX_WEIGHT:g} are refused (they "
                               f"multiply the adapter's scale, which loading caps at {MAX_SCALE:g})")
    return Mixture(tuple((n, float(w)) for n, w in pairs))


def parse_model(model: str) -> Mixture | None:
    """The mixture a model string names, or None when it names no mixture ("auto", "auto:arrow",
    "base", one adapter). "a:0.7+b:0.3" and "a:0.5" are mixtures; a term without a weight
    inside a "+" mixture has weight 1. Raises MixtureError for a malformed or invalid one."""
    terms = re.split(r"(?<!:)\+", model)  # "a:+1" is a weight's sign, not a second term
    if len(terms) == 1:
        name, sep, weight = model.partition(":")
        if not sep or name == "auto" or not _looks_weighted(weight.strip()):  # "auto:arrow": a router
            return None
    pairs = []
    for term in terms:
        name, sep, weight = term.strip().partition(":")
        if not sep:
            name, weight = term.strip(), "1"
        if ":" in weight:
            raise MixtureError(f"{term.strip()!r} has more than one ':' (write name:weight, e.g. iso_date:0.7)")
        pairs.append((name.strip(), _weight(weight.strip(), term.strip())))
    return mixture_of(pairs)


def check_names(names: Iterable[str], known: Iterable[str], what: str) -> None:
    """Raise AdapterError naming the first of `names` that is not loaded (`what`: where it was)."""
    known = set(known)
    for name in names:
        if name not in known:
            raise AdapterError(name, f"unknown adapter {name!r} in {what}; loaded: {', '.join(sorted(known))}")


def allowed_set(names: list[str], allow: Iterable[str] | None, deny: Iterable[str]) -> frozenset[str] | None:
    """The adapters a router may choose: `allow` (default every loaded one) minus `deny`; None
    when neither restricts anything."""
    if allow is None and not deny:
        return None
    return frozenset(names if allow is None else allow) - frozenset(deny)


class MixturePolicy(FixedPolicy):
    """Every token of every row uses the mixture's slots and weights; the summary lists it."""

    def __init__(self, engine, mixture: Mixture, rows: int):
        super().__init__([mixture.choice(engine)] * rows)
        self.mixture = mixture

    def summary(self, engine, row: int) -> dict:
        return {"router": None, "adapter": self.mixture.names, "confidence": 1.0,
                "mixture": dict(self.mixture.weights)}

    def events(self, row: int) -> list[dict]:
        return [{"token_index": 0, "event": "mixture", "adapters": dict(self.mixture.weights)}]
