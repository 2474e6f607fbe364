"""Sequence-level selector (after TAME's selector network): a small classifier on the base
model's pooled hidden states picks one adapter per prompt, or abstains to the base model.

Classes are the library's adapters plus `__none__`, learned from generic out-of-suite prompts
(open requests and near misses: `routing.generic`). Confidence is calibrated by temperature
scaling on held-out prompts (softening only), and the abstain threshold is chosen on them too,
at most MAX_THRESHOLD: the router abstains when `__none__` wins or the calibrated top
probability is below the threshold. (In the committed routers both bounds bind: temperature 1,
threshold 0.7; the held-out prompts, in the training wording, are too easy to move them.) The file records each adapter's name and weight fingerprint,
so a changed library is detected instead of silently misrouted.

The fast head (issue 17: `auto` must cost at most 1.1x naming the adapter). The same classifier,
trained on the same prompts at `features.fast_layer` (5 of 30: a third of the middle layer's
pass), decides whole prompts first; only the prompts it does not send to an adapter (abstained,
out of suite, below its threshold) are read on up to the main layer (from the fast pass's hidden
states, `features.resuming`) and decided by the main head, so the base model answers exactly the
prompts it answered before. The main head stays where it was because it also reads prompt
fragments: segmentation (`switch.segment`) scores the units of a prompt with it, and at layers
5, 6 and 8 it found 2-6 fewer of the demo's 81 free-form composites (docs/routing.md); the fast
head only screens which prompts it reads so, and its reading of a batch's whole prompts comes
from that screen's pass (`features.read_ahead`). Adapters added after training
(`routing.added`) are scored on the main features: once the library has grown, the prompts the
fast head picks an adapter for at less than FAST_SURE are read at the main layer too, where an
added head may claim them; adding an adapter leaves every decision it does not claim as it was.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loraswitch.engine import Engine
from loraswitch.routing.added import AddedHeads, Claims, sync_added
from loraswitch.routing.base import (
    NONE_CLASS,
    Decision,
    DecisionPolicy,
    Router,
    StaleRouterError,
    check_library,
    library_signature,
    load_router_file,
    save_router_file,
)
from loraswitch.routing.features import (
    FEATURES,
    default_layer,
    fast_layer,
    layer_features,
    prompt_features,
    resuming,
)

FILE = "seq_router.safetensors"
RESERVOIR = 48  # standardized training features kept per class (incl. __none__) for adapters added later
# once adapters were added, a prompt the fast head picks a trained adapter for at this calibrated
# confidence or more is not read at the main layer (where added heads claim): half a prefill
# saved on most in-suite prompts (`cascade`). Chosen on the validation splits of both libraries'
# leave-one-out as the lowest value that keeps the added adapters' share of their prompts
# (`benchmarks/growing_cascade.py`: the demo's kept it from 0.98, BIG-bench's from 0.995)
FAST_SURE = 0.995


@dataclass
class Reservoir:
    """A few standardized training features per class, kept in the selector file: what an
    adapter added later is calibrated against (its head may claim only a small share of them)."""

    z: torch.Tensor  # [N, D] standardized features (float16 on disk)
    labels: torch.Tensor  # [N] class index


class SequenceRouter(Router):
    name = "seq"

    def __init__(self, classes: list[str], W: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 layer: int, temperature: float = 1.0, threshold: float = 0.5, library: list[dict] | None = None,
                 reservoir: Reservoir | None = None, trained_at: float | None = None,
                 fast: SequenceRouter | None = None):
        self.classes, self.W, self.b, self.mean, self.std = classes, W, b, mean, std
        self.layer, self.temperature, self.threshold = layer, temperature, threshold
        self.library = library or []
        self.reservoir, self.trained_at = reservoir, trained_at
        self.added = AddedHeads()  # adapters loaded after training (`routing.added`)
        self.fast = fast  # the same classifier at a lower layer, tried first (the module doc)

    # ------------------------------------------------------------------ inference
    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats - self.mean) / self.std) @ self.W.T + self.b

    def probabilities(self, engine: Engine, prompts: list[str]) -> torch.Tensor:
        return torch.softmax(self.logits(prompt_features(engine, prompts, self.layer)) / self.temperature, -1)

    def decide(self, probs: torch.Tensor, engine: Engine, claims: Claims | None = None) -> list[Decision]:
        """The trained head's decision per row, with the row's `__none__` probability, unless an
        added adapter's head claims the row (a claimed row has none: that class knows nothing of
        the added adapter's task, and a client's bar on it would turn away every prompt an added
        adapter takes)."""
        none = self.classes.index(NONE_CLASS) if NONE_CLASS in self.classes else None
        out = []
        for i, row in enumerate(probs):
            scores = {c: round(float(p), 4) for c, p in zip(self.classes, row) if c != NONE_CLASS and c in engine.adapters}
            claim = claims.best(i) if claims is not None else None
            if claims is not None:
                scores.update(claims.scores(i))
            if claim is not None:
                out.append(claim.decision(scores))
                continue
            d = self._trained(row, scores, engine)
            if none is not None:
                d.none_probability = round(float(row[none]), 4)
            out.append(d)
        return out

    def _trained(self, row: torch.Tensor, scores: dict[str, float], engine: Engine) -> Decision:
        """The trained head's own decision on one row of probabilities."""
        top = int(row.argmax())
        conf = float(row[top])
        name = self.classes[top]
        if name == NONE_CLASS:
            return Decision(None, conf, scores, f"out of suite (p={conf:.2f} that no adapter fits)", "trained")
        if conf < self.threshold:
            return Decision(None, conf, scores, f"confidence {conf:.2f} below threshold {self.threshold:.2f}", "trained")
        if name not in engine.adapters:
            return Decision(None, conf, scores, f"picked {name!r}, which is not loaded", "trained")
        return Decision(name, conf, scores, source="trained")

    def route(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None) -> list[Decision]:
        return self.cascade(engine, prompts, allowed)[0]

    def policy(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None) -> DecisionPolicy:
        """The decisions for every token, keeping the standardized main-layer features of the
        prompts sent to no adapter (what shift detection reads; zeros for the others where the
        fast head decided)."""
        decisions, z = self.cascade(engine, prompts, allowed)
        return DecisionPolicy(engine, decisions, self.name, z)

    def cascade(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None,
                read: Callable[[Engine, list[str], int], torch.Tensor] | None = None,
                ) -> tuple[list[Decision], torch.Tensor]:
        """The fast head's decisions where it picks an adapter, the main head's for the rest (all
        of them without a fast head), and the main features (zeros where the fast head decided).
        Once the library has grown, an added head (scored on the main features) may claim any
        prompt, so the prompts the fast head picks an adapter for at less than `_sure` are read
        at the main layer too: a claim wins, else the fast head's pick stands; those it picks at
        `_sure` or more keep its pick (`benchmarks/growing_cascade.py`, `auto_cost.py --grow`).
        `read(engine, texts, layer)` gives the features (benchmarks pass ones read once,
        `features.precomputed`; default `features.prompt_features`). Cost: the fast layer's
        pass (free when segmentation's screen read it ahead) and, for the unsure share u, the
        layers from the fast one up to the main one, resumed from the fast pass's hidden states
        (`features.resuming`): 5 + 10u layers of 30, never more than the 15 one pass reading
        both layers would cost."""
        fast = self.fast
        read = read or prompt_features
        if fast is None:
            feats = read(engine, prompts, self.layer)
            return self.route_features(engine, feats, allowed), (feats - self.mean) / self.std
        sure = self._sure(allowed)
        with resuming():
            out = fast.route_features(engine, read(engine, prompts, fast.layer), allowed)
            rest = [i for i, d in enumerate(out) if d.adapter is None or d.confidence < sure]
            feats = read(engine, [prompts[i] for i in rest], self.layer) if rest else None
        z = torch.zeros(len(prompts), self.mean.numel())
        if rest:
            for i, m in zip(rest, self.route_features(engine, feats, allowed)):
                f = out[i]
                if m.source == "trained" and f.adapter is not None:  # no claim: the fast head's pick stands
                    f.scores.update({k: v for k, v in m.scores.items() if k in self.added})
                    m = f
                out[i] = m
            z[rest] = (feats - self.mean) / self.std
        return out, z

    def _sure(self, allowed: frozenset[str] | None) -> float:
        """The fast head's confidence from which its pick stands unread at the main layer: 0 where
        no added head may claim (nothing added, or none of them allowed), FAST_SURE once the
        library has grown; with `allowed` restricting it, every pick is read (the fast head's
        confidence is renormalized over the allowed classes then, which would skip more)."""
        heads = [n for n in self.added if allowed is None or n in allowed] if self.added else []
        if not heads:
            return 0.0
        return FAST_SURE if allowed is None else 1.01

    def route_features(self, engine: Engine, feats: torch.Tensor,
                       allowed: frozenset[str] | None = None) -> list[Decision]:
        """Decisions from features already computed (`features.prompt_features` at `self.layer`):
        the trained head's, and the added heads' claims over them. With `allowed`, the others
        are out of the running as if they were not loaded: their probability mass is removed and
        the rest renormalized (so a prompt for a denied adapter mostly abstains rather than
        going to the runner-up), and their added heads claim nothing."""
        scaled = self.logits(feats) / self.temperature
        claims = self.added.claims(feats, (feats - self.mean) / self.std, engine) if self.added else None
        if allowed is not None:  # renormalized in log space: the kept mass may be below any float epsilon
            keep = torch.tensor([c == NONE_CLASS or c in allowed for c in self.classes])
            scaled = scaled.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scaled, -1)
        if allowed is not None and claims is not None:
            off = torch.tensor([h.name not in allowed for h in claims.heads], dtype=torch.bool)
            claims.margins = claims.margins.masked_fill(off, float("-inf"))
        decisions = self.decide(probs, engine, claims)
        if allowed is not None and not allowed & set(engine.adapters):  # not "out of suite": nothing to choose
            for d in decisions:
                d.reason = "allow / deny leave no adapter to choose from: the base model answers"
        return decisions

    @property
    def ident(self) -> str:
        """Identifies this trained selector: heads calibrated against another one are refitted."""
        return hashlib.sha1(self.W.float().numpy().tobytes()).hexdigest()[:16]

    def raw_reservoir(self) -> torch.Tensor:
        """The reservoir's features as the feature pass produced them (zero-shot scores read these)."""
        assert self.reservoir is not None
        return self.reservoir.z.float() * self.std + self.mean

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        meta = {"classes": self.classes, "layer": self.layer, "temperature": self.temperature,
                "threshold": self.threshold, "library": self.library, "features": FEATURES,
                "trained_at": self.trained_at}
        tensors = {"W": self.W, "b": self.b, "mean": self.mean, "std": self.std}
        if self.fast is not None:
            f = self.fast
            meta["fast"] = {"classes": f.classes, "layer": f.layer, "temperature": f.temperature,
                            "threshold": f.threshold}
            tensors |= {"fast_W": f.W, "fast_b": f.b, "fast_mean": f.mean, "fast_std": f.std}
        if self.reservoir is not None:
            tensors |= {"reservoir": self.reservoir.z.half(), "reservoir_labels": self.reservoir.labels}
        return save_router_file(Path(directory) / FILE, tensors, meta)

    @classmethod
    def load(cls, directory: str | Path, engine: Engine | None = None) -> SequenceRouter:
        """The trained selector; with an engine, every adapter loaded since training gets a head
        of its own (`routing.added`) and a changed adapter is refused as stale."""
        path = Path(directory) / FILE
        t, meta = load_router_file(path, "train one with `loraswitch train-router --router seq`")
        if meta.get("features") != FEATURES:
            raise StaleRouterError(f"the sequence router at {path} was trained on prompt features "
                                   f"{meta.get('features', 'raw-mean-last')!r}, this version computes {FEATURES!r}; "
                                   "retrain it with `loraswitch train-router --router seq`")
        reservoir = Reservoir(t["reservoir"], t["reservoir_labels"]) if "reservoir" in t else None
        fast = None
        if "fast" in meta and "fast_W" in t:  # a file from before the fast head has none: main head only
            f = meta["fast"]
            fast = cls(f["classes"], t["fast_W"], t["fast_b"], t["fast_mean"], t["fast_std"], f["layer"],
                       f["temperature"], f["threshold"])
        router = cls(meta["classes"], t["W"], t["b"], t["mean"], t["std"], meta["layer"], meta["temperature"],
                     meta["threshold"], meta["library"], reservoir, meta.get("trained_at"), fast)
        if engine is not None:
            check_library(engine, router.library, "the sequence router", grows=reservoir is not None)
            sync_added(router, engine, Path(directory))
        return router


def _fit_temperature(logits: torch.Tensor, labels: torch.Tensor, lowest: float = 1.0) -> float:
    """Temperature minimising held-out NLL (Guo et al. 2017), by a log-spaced grid search, never
    below 1: it may soften the classifier, never sharpen it. The validation prompts are in the
    training wording, easier than what users write; fitted freely on them the temperature fell to
    0.03 in some trainings and not others, every confidence read 1.00, and how many near misses
    the router abstained on changed with each draw of bundled `__none__` prompts (docs/routing.md
    "Near misses"; the sweep there, `benchmarks/routing_probe.py --sweep`, fits with this rule)."""
    best, best_t = math.inf, 1.0
    for t in torch.logspace(math.log10(lowest), 1.5, 61).tolist():
        nll = torch.nn.functional.cross_entropy(logits / t, labels).item()
        if nll < best:
            best, best_t = nll, t
    return best_t


MAX_THRESHOLD = 0.7  # the abstain threshold's ceiling: docs/routing.md "Near misses" has the trade-off
WEIGHT_DECAY = 3e-3


def _pick_threshold(probs: torch.Tensor, labels: torch.Tensor, none_idx: int, keep: float = 0.99,
                    ceiling: float = MAX_THRESHOLD) -> float:
    """The highest threshold that still answers `keep` of the correctly routed in-suite prompts,
    at most `ceiling`: a higher one abstains on more near misses and on more new wordings of the
    library's own tasks alike (`benchmarks/routing_probe.py --sweep`)."""
    conf, pred = probs.max(-1)
    ok = (pred == labels) & (labels != none_idx)
    if ok.sum() == 0:
        return min(0.5, ceiling)
    return float(torch.quantile(conf[ok], 1 - keep).clamp(0.2, ceiling))


def train_selector(engine: Engine, train: dict[str, list[str]], val: dict[str, list[str]],
                   layer: int | None = None, steps: int = 400, progress: bool = True,
                   fast: int | None = -1, ceiling: float = MAX_THRESHOLD) -> SequenceRouter:
    """Train on prompts per class (adapter names, plus NONE_CLASS for out-of-suite prompts): the
    main head at `layer` and the fast head at `fast` (-1: `features.fast_layer`; None, or not
    below `layer`: no fast head), both from one feature pass over the prompts, each with an
    abstain threshold of at most `ceiling`."""
    layer = default_layer(engine) if layer is None else layer
    fast = fast_layer(engine) if fast == -1 else fast
    fast = fast if fast is not None and fast < layer else None
    missing = [n for n in train if n != NONE_CLASS and n not in engine.adapters]
    if missing:
        raise ValueError(f"training data for adapters that are not loaded: {missing}")
    classes = [n for n in engine.names if n in train] + ([NONE_CLASS] if NONE_CLASS in train else [])

    layers = [layer] + ([fast] if fast is not None else [])

    def featurize(data: dict[str, list[str]]) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        prompts, labels = [], []
        for i, c in enumerate(classes):
            prompts += data.get(c, [])
            labels += [i] * len(data.get(c, []))
        return layer_features(engine, prompts, layers, progress=progress), torch.tensor(labels, dtype=torch.long)

    (x, y), (xv, yv) = featurize(train), featurize(val)
    router = fit_selector(classes, x[layer], y, xv[layer], yv, layer, steps, progress, ceiling=ceiling)
    if fast is not None:
        head = fit_selector(classes, x[fast], y, xv[fast], yv, fast, steps, progress, ceiling=ceiling)
        router.fast = SequenceRouter(classes, head.W, head.b, head.mean, head.std, fast, head.temperature,
                                     head.threshold)
    # the whole library is recorded, not just the classes: an adapter added later is detected
    router.library = library_signature(engine)
    return router


def fit_selector(classes: list[str], x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
                 layer: int, steps: int = 400, progress: bool = False, weight_decay: float = WEIGHT_DECAY,
                 ceiling: float = MAX_THRESHOLD, lowest_temperature: float = 1.0) -> SequenceRouter:
    """The selector on precomputed features (labels index `classes`): softmax regression,
    temperature and abstain threshold (at most `ceiling`) on the validation features, and a
    reservoir of RESERVOIR standardized training features per class for adapters added later.
    Weight decay 3e-3 (1e-3 before near misses were in `__none__`): picked on the sweep's first
    run; in its committed rerun the three values' curves lie within a point or two of each other
    (`benchmarks/routing_probe.py --sweep`)."""
    if len(yv) == 0 or len(y) < 2 * len(classes):  # too few prompts to hold some out (1 in 10 by hash):
        x, y = torch.cat([x, xv]), torch.cat([y, yv])  # train and calibrate on all of them
        xv, yv = x, y
    mean, std = x.mean(0), x.std(0, correction=int(len(x) > 1)) + 1e-4
    z, zv = (x - mean) / std, (xv - mean) / std
    torch.manual_seed(0)
    W = torch.zeros(len(classes), x.shape[1], requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=1e-2, weight_decay=weight_decay)
    counts = torch.bincount(y, minlength=len(classes)).float()
    class_w = counts.sum() / (len(classes) * counts.clamp(min=1))  # balance classes
    for _ in tqdm(range(steps), desc="train seq router", disable=not progress):
        loss = torch.nn.functional.cross_entropy(z @ W.T + b, y, weight=class_w)
        opt.zero_grad()
        loss.backward()
        opt.step()
    W, b = W.detach(), b.detach()
    val_logits = zv @ W.T + b
    temperature = _fit_temperature(val_logits, yv, lowest_temperature)
    none_idx = classes.index(NONE_CLASS) if NONE_CLASS in classes else -1
    threshold = _pick_threshold(torch.softmax(val_logits / temperature, -1), yv, none_idx, ceiling=ceiling)
    keep = torch.cat([(y == i).nonzero()[:RESERVOIR, 0] for i in range(len(classes))])
    return SequenceRouter(classes, W, b, mean, std, layer, temperature, threshold,
                          reservoir=Reservoir(z[keep].half(), y[keep]), trained_at=time.time())
