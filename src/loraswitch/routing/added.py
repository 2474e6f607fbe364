"""Adapters added after the selector was trained: each gets a one-vs-rest head of its own,
calibrated against the selector's reservoir (a few stored training features per known class).

Why a head per added adapter rather than a retrained softmax: retraining needs every adapter's
training prompts and minutes of compute, and it moves the decisions for adapters that were
routed right. A head that only *claims* prompts leaves the trained decision bit-for-bit as it
was on every prompt it does not claim, and its threshold is set so that it claims only
`CLAIM_RATE` of the reservoir's prompts (the known classes and `__none__`), so it cannot steal
more than about that share of their traffic.

Two kinds of head:
* from examples (`examples.jsonl` / `.txt` in the adapter folder, `--examples FILE`, or
  `"examples"` in `POST /v1/adapters`): logistic regression of the examples' standardized
  features against half of the reservoir; threshold on the other half. Seconds on CPU.
* zero-shot, from the adapter's weights (`routing.zeroshot`): no data at all.

Heads are persisted (`added/<adapter>.safetensors` next to the routers, with the adapter's
fingerprint and a digest of its examples), so a restart routes the same way without refitting;
a head whose adapter changed is refitted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loraswitch.base import cache_dir
from loraswitch.constants import DEMO_ROUTER_DIR, LIBRARIES_DIR
from loraswitch.engine import Engine
from loraswitch.library import adapter_examples
from loraswitch.routing.base import NONE_CLASS, Decision, load_router_file, save_router_file
from loraswitch.routing.features import prompt_features
from loraswitch.routing.zeroshot import DEFAULT_VARIANT, RANK, adapter_factor, quadratic_scores, stack

# share of the reservoir (the known classes' prompts) an added head may claim
EXAMPLES_CLAIM_RATE = 0.005
ZERO_SHOT_CLAIM_RATE = 0.01
Z_WEIGHT = 4.0  # weight of the raw feature next to the logits in a few-shot head's space
EXAMPLES, ZERO_SHOT = "examples", "zero-shot"


@dataclass
class Head:
    """One added adapter's score and threshold. `w`: the examples' centroid in the few-shot
    `Space`; `U`: the zero-shot factor scoring raw features (`zeroshot.quadratic_scores`)."""

    name: str
    fingerprint: str
    source: str
    key: str  # digest of the examples, or the zero-shot variant: a different one means refit
    threshold: float
    scale: float  # spread of the reservoir's scores: margins are reported in these units
    since: float
    n_examples: int = 0
    selector: str = ""  # the trained selector it was calibrated against (`SequenceRouter.ident`)
    center: float = 0.0  # zero-shot: the raw score's mean and spread on the reservoir
    spread: float = 1.0
    w: torch.Tensor | None = None
    U: torch.Tensor | None = None
    where: str = ""  # the file it is kept in, or why it is kept in memory only

    def describe(self) -> str:
        how = f"from {self.n_examples} examples" if self.source == EXAMPLES else "zero-shot from its weights"
        if self.source == ZERO_SHOT and self.U is None:
            how = "not routable zero-shot (no module reads the residual stream; give it examples)"
        return f"{how}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))}"

@dataclass
class Claim:
    head: Head
    margin: float

    def decision(self, scores: dict[str, float]) -> Decision:
        conf = _confidence(self.margin)
        return Decision(self.head.name, conf, scores, f"claimed by {self.head.name}'s head ({self.head.describe()})",
                        self.head.source)


def _confidence(margin: float) -> float:
    return 1 / (1 + math.exp(-max(-30.0, min(30.0, margin))))


class Claims:
    """The added heads' margins over their thresholds for a batch of prompts ([N, M])."""

    def __init__(self, heads: list[Head], margins: torch.Tensor):
        self.heads, self.margins = heads, margins

    def best(self, row: int) -> Claim | None:
        if not self.heads:
            return None
        j = int(self.margins[row].argmax())
        m = float(self.margins[row, j])
        return Claim(self.heads[j], m) if m > 0 else None

    def scores(self, row: int) -> dict[str, float]:
        return {h.name: round(_confidence(float(m)), 4) for h, m in zip(self.heads, self.margins[row])}


class Space:
    """Where few-shot heads compare prompts: the standardized feature (scaled by Z_WEIGHT) next to
    the trained head's logits, unit-normalized. A head's score is the cosine to its examples'
    centroid minus the best cosine to a known class's centroid (from the reservoir's even rows):
    the logits carry what the trained selector learned to ignore (wording), so held-out
    wordings of known tasks stay with their class; the raw feature carries what the logits of
    the known classes cannot express (a task none of them is for)."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, reservoir_z: torch.Tensor, labels: torch.Tensor,
                 present: torch.Tensor | None = None):
        """`present`: the class indices whose adapters are loaded (and `__none__`); None: all. A
        class whose adapter is gone is no competitor: an added adapter that replaces it (v2 under a
        new name, or the task served by a library without it) takes its prompts, where the gone
        class's centroid used to keep them from every added head."""
        self.W, self.b = W, b
        # the reservoir rows of the present classes: what added heads compete with
        self.kept = torch.ones(len(labels), dtype=torch.bool) if present is None else torch.isin(labels, present)
        fit = (torch.arange(len(labels)) % 2 == 0) & self.kept
        self.calibration = (torch.arange(len(labels)) % 2 == 1) & self.kept  # rows a head's threshold is set on
        v = self.embed(reservoir_z[fit])
        self.known = torch.stack([v[labels[fit] == c].mean(0) for c in labels[fit].unique()])
        self.known = self.known / self.known.norm(dim=1, keepdim=True)

    def embed(self, z: torch.Tensor) -> torch.Tensor:
        logits = z @ self.W.T + self.b
        v = torch.cat([z * (Z_WEIGHT / z.shape[1] ** 0.5), logits / logits.shape[1] ** 0.5], 1)
        return v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def scores(self, z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """[N, M] margins of M heads' centroids ([D', M], unit columns) over the known classes."""
        v = self.embed(z)
        return v @ centroids - (v @ self.known.T).max(1, keepdim=True).values


class Known:
    """The trained adapters' own zero-shot scores, each standardized on the reservoir: a zero-shot
    head claims a prompt by how much more it excites the new adapter than any known one."""

    def __init__(self, factors: list[torch.Tensor], raw_reservoir: torch.Tensor):
        self.U = stack(factors, RANK) if factors else None
        if self.U is not None:
            s = quadratic_scores(raw_reservoir, self.U, RANK)
            self.center, self.spread = s.mean(0), s.std(0).clamp(min=1e-9)

    def best(self, raw: torch.Tensor) -> torch.Tensor:
        """[N] the highest standardized score of a known adapter (0 when none is scorable)."""
        if self.U is None:
            return torch.zeros(raw.shape[0])
        return ((quadratic_scores(raw, self.U, RANK) - self.center) / self.spread).max(1).values


class AddedHeads(dict):
    """name -> Head, scored together: the few-shot heads as one [D', M] product and the zero-shot
    heads as one [d, M k] product, so a decision costs the same matmul however many are added."""

    space: Space | None = None
    known: Known | None = None

    def claims(self, raw: torch.Tensor, z: torch.Tensor, engine: Engine) -> Claims:
        if getattr(self, "_stacked", None) is None:
            self._stacked = self._stack()
        heads, C, U, center, spread, thr, scale = self._stacked
        parts = []
        if C is not None:
            parts.append(self.space.scores(z, C))
        if U is not None:
            zs = (quadratic_scores(raw, U, RANK) - center) / spread
            parts.append(zs - self.known.best(raw)[:, None])
        margins = ((torch.cat(parts, 1) - thr) / scale) if parts else torch.zeros(raw.shape[0], 0)
        live = [i for i, h in enumerate(heads) if h.name in engine.adapters]
        return Claims([heads[i] for i in live], margins[:, live])

    def _stack(self) -> tuple:
        fs = [h for h in self.values() if h.source == EXAMPLES]
        zs = [h for h in self.values() if h.source == ZERO_SHOT and h.U is not None]
        heads = fs + zs
        C = torch.stack([h.w for h in fs], 1) if fs else None
        U = stack([h.U for h in zs], RANK) if zs else None
        center, spread = torch.tensor([h.center for h in zs]), torch.tensor([h.spread for h in zs])
        thr = torch.tensor([h.threshold for h in heads])
        scale = torch.tensor([h.scale for h in heads])
        return heads, C, U, center, spread, thr, scale

    def __setitem__(self, key, value):
        self._stacked = None
        super().__setitem__(key, value)


# ------------------------------------------------------------------------------- fitting

def _calibrate(neg_scores: torch.Tensor, rate: float) -> tuple[float, float]:
    """(threshold claiming `rate` of these negatives, their spread)."""
    return float(torch.quantile(neg_scores, 1 - rate)), float(neg_scores.std().clamp(min=1e-6))


def fit_examples_head(name: str, fingerprint: str, z_pos: torch.Tensor, space: Space, reservoir_z: torch.Tensor,
                      key: str) -> Head:
    """The examples' centroid in `space`; the threshold claims EXAMPLES_CLAIM_RATE of the
    reservoir's odd rows of the present classes (the known centroids were not computed from
    them), and is at least 0."""
    centroid = space.embed(z_pos).mean(0)
    centroid = centroid / centroid.norm()
    cal = space.scores(reservoir_z[space.calibration], centroid[:, None])[:, 0]
    threshold, scale = _calibrate(cal, EXAMPLES_CLAIM_RATE)
    # and never claim a prompt nearer to a known class's centroid than to the examples': a task
    # close to a known one (German next to French) must not take that one's borderline prompts
    threshold = max(threshold, 0.0)
    return Head(name, fingerprint, EXAMPLES, key, threshold, scale, time.time(), len(z_pos), w=centroid)


def fit_zero_shot_head(engine: Engine, name: str, raw_reservoir: torch.Tensor, known: Known,
                       variant: str = DEFAULT_VARIANT) -> Head:
    """The adapter's weight-derived score (`zeroshot`), standardized on the reservoir, minus the
    best known adapter's; thresholded so it claims ZERO_SHOT_CLAIM_RATE of the reservoir."""
    adapter = engine.adapters[name]
    U = factor(engine, name, variant)
    head = Head(name, adapter.fingerprint, ZERO_SHOT, f"{ZERO_SHOT}:{variant}", 0.0, 1.0, time.time(), U=U)
    if U is not None:
        s = quadratic_scores(raw_reservoir, U, U.shape[1])[:, 0]
        head.center, head.spread = float(s.mean()), float(s.std().clamp(min=1e-9))
        margin = (s - head.center) / head.spread - known.best(raw_reservoir)
        head.threshold, head.scale = _calibrate(margin, ZERO_SHOT_CLAIM_RATE)
    return head


_FACTORS: dict[tuple[str, str], torch.Tensor | None] = {}  # (fingerprint, variant) -> U


def factor(engine: Engine, name: str, variant: str = DEFAULT_VARIANT) -> torch.Tensor | None:
    """`zeroshot.adapter_factor`, computed once per adapter weights."""
    adapter = engine.adapters[name]
    key = (adapter.fingerprint, variant)
    if key not in _FACTORS:
        _FACTORS[key] = adapter_factor(engine, adapter, variant)
    return _FACTORS[key]


# ------------------------------------------------------------------------------- keeping heads

_MEMORY: dict[tuple[str, str, str], Head] = {}  # (folder, adapter, fingerprint) -> head


def added_dir(router_dir: Path) -> Path:
    """Where heads of adapters added to the library at `router_dir` are kept: `<router_dir>/added`,
    except for a library embedded in the package, whose additions are the user's, not the
    package's: they go to `$LORASWITCH_CACHE/routers/<library>/added`."""
    router_dir = router_dir.resolve()
    if router_dir.is_relative_to(LIBRARIES_DIR):
        return cache_dir() / "routers" / router_dir.relative_to(LIBRARIES_DIR) / "added"
    return router_dir / "added"


def forget_head(router_dir: Path | None, name: str) -> None:
    """Drop the head kept for `name` (an adapter removed from the library): on disk, heads of
    every adapter ever added piled up in `added/`; in memory, every fingerprint's. Re-adding the
    adapter fits its head again (seconds)."""
    for ident in [k for k in _MEMORY if k[1] == name]:
        _MEMORY.pop(ident, None)
    with contextlib.suppress(OSError):  # None: the routers `load_router` reads by default
        (added_dir(Path(router_dir or DEMO_ROUTER_DIR)) / f"{name}.safetensors").unlink(missing_ok=True)


def examples_key(prompts: list[str]) -> str:
    return "examples:" + hashlib.sha1(json.dumps(prompts).encode()).hexdigest()[:16]


def _save(head: Head, folder: Path) -> str:
    tensors = {"w": head.w} if head.w is not None else {}
    if head.U is not None:
        tensors["U"] = head.U
    meta = {k: getattr(head, k) for k in ("name", "fingerprint", "source", "key", "threshold", "scale", "since",
                                          "n_examples", "selector", "center", "spread")}
    try:
        path = save_router_file(folder / f"{head.name}.safetensors", tensors or {"none": torch.zeros(1)}, meta)
    except OSError as exc:
        return f"kept in memory only ({folder} is not writable: {exc.strerror or exc})"
    return str(path)


def _fits(head: Head | None, fingerprint: str, key: str | None, selector: str) -> bool:
    """A kept head serves if it was fitted for these weights and this selector and, when examples
    are given now, for these examples (loaded again without examples, an adapter keeps its
    few-shot head)."""
    if head is None or head.fingerprint != fingerprint or head.selector != selector:
        return False
    return key is None and head.source == EXAMPLES or head.key == (key or f"{ZERO_SHOT}:{DEFAULT_VARIANT}")


def _load(folder: Path, name: str) -> Head | None:
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        return None
    try:
        tensors, meta = load_router_file(path, "")
    except (OSError, ValueError):
        return None
    return Head(**meta, w=tensors.get("w"), U=tensors.get("U"), where=str(path))


def sync_added(router, engine: Engine, router_dir: Path) -> None:
    """Give every loaded adapter the selector has no class for a head: kept in memory or on
    disk if it was fitted before for these weights and examples, else fitted now (from its
    examples when it has any, zero-shot otherwise) and kept. `router` is a `seq.SequenceRouter`
    with a reservoir."""
    new = [n for n in engine.names if n not in router.classes]
    if not new:
        return
    folder = added_dir(router_dir)
    present = torch.tensor([i for i, c in enumerate(router.classes) if c == NONE_CLASS or c in engine.adapters])
    z_res, raw_res = router.reservoir.z.float(), router.raw_reservoir()
    router.added.space = Space(router.W, router.b, z_res, router.reservoir.labels, present)
    trained = [n for n in router.classes if n in engine.adapters]
    raw_res = raw_res[router.added.space.kept]
    router.added.known = Known([f for n in trained if (f := factor(engine, n)) is not None], raw_res)
    for name in new:
        adapter = engine.adapters[name]
        examples = list(engine.examples.get(name) or [p for p, _ in adapter_examples(adapter)])
        key = examples_key(examples) if examples else None
        ident = (str(folder), name, adapter.fingerprint)
        head = _MEMORY.get(ident)
        if not _fits(head, adapter.fingerprint, key, router.ident):
            head = _load(folder, name)
        if not _fits(head, adapter.fingerprint, key, router.ident):
            if examples:
                z = (prompt_features(engine, examples, router.layer) - router.mean) / router.std
                head = fit_examples_head(name, adapter.fingerprint, z, router.added.space, z_res, key)
            else:
                head = fit_zero_shot_head(engine, name, raw_res, router.added.known)
            head.selector = router.ident
            head.where = _save(head, folder)
        _MEMORY[ident] = head
        router.added[name] = head
