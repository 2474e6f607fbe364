"""Noticing new tasks in production (after TAME's task-shift detection): the prompts `auto` sent to
no adapter are clustered online on the router's own features, and a cluster that grows past
`min_size` is reported as a task shift: traffic the library has no adapter for.

Why the router's features: they are already computed for every routed prompt (no extra forward),
and they are the space the selector separates tasks in, so prompts of one task land close
together whatever their wording, while the unrelated odds and ends that abstain stay scattered.

The clustering is leader clustering on cosine similarity, one pass, no stored points: a prompt
joins the cluster whose mean direction is nearest when the cosine is at least `similarity`, else
it starts a cluster of its own; two clusters whose members are about as alike across as within
merge (`_same_task`: a task's first prompts may seed two clusters before their means settle). Memory is bounded: at most `max_clusters` clusters, each a summed feature vector, counts
and times; when full, the smallest cluster (then the longest unseen) is forgotten.

Privacy: prompt texts are kept only with `keep_prompts` (`loraswitch serve --keep-prompts`): five
recent examples per cluster for the report and up to `max_prompts` for `loraswitch shifts export`.
Without it only counts, times and feature sums are kept.

`record_unrouted(features, prompt)` is the one entry point: the switch calls it for prompts
`auto` abstained on (`Switch.on_unrouted`); anything else that leaves a prompt unrouted (an
escalation to another model) calls it the same way.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

MERGE_SIMILARITY = 0.75  # a single prompt's direction this close to a cluster's: one task
MERGE_RATIO = 0.6  # across two clusters' members, this share of the within-cluster similarity: one task
MERGE_FLOOR = 0.2  # ... and at least this mean cosine across
EXAMPLES = 5  # example prompts a report shows per cluster


@dataclass
class Cluster:
    id: int
    total: torch.Tensor  # sum of its members' unit feature vectors
    size: int
    first_seen: float
    last_seen: float
    examples: deque = field(default_factory=lambda: deque(maxlen=EXAMPLES))
    prompts: deque = field(default_factory=deque)  # with keep_prompts, bounded by max_prompts

    @property
    def direction(self) -> torch.Tensor:
        return self.total / self.total.norm().clamp(min=1e-12)

    def absorb(self, other: Cluster) -> None:
        self.total += other.total
        self.size += other.size
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        self.examples.extend(other.examples)
        self.prompts.extend(other.prompts)


def _cohesion(c: Cluster) -> float:
    """Mean pairwise cosine of a cluster's members, from its sum alone: |sum|^2 = n + n(n-1) rho."""
    n = c.size
    return float((c.total @ c.total - n) / (n * (n - 1)))


def _same_task(a: Cluster, b: Cluster) -> bool:
    """Two clusters are one task when their members are about as alike across the two as within
    each (cross cosine >= MERGE_RATIO of the within ones, and at least MERGE_FLOOR): a task's
    first prompts can seed two clusters before its mean settles, while two different tasks stay
    apart however close they are (number spelling in English and in French: 0.31 across, 0.46
    within). A cluster of one has no cohesion yet: its direction must be MERGE_SIMILARITY close."""
    if a.size < 2 or b.size < 2:
        return float(a.direction @ b.direction) >= MERGE_SIMILARITY
    cross = float(a.total @ b.total) / (a.size * b.size)
    within = max(_cohesion(a), 1e-6) * max(_cohesion(b), 1e-6)
    return cross >= MERGE_FLOOR and cross >= MERGE_RATIO * within**0.5


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


class ShiftDetector:
    """Online clusters of unrouted prompts' router features; thread-safe (the worker records, the
    HTTP handlers read)."""

    def __init__(self, similarity: float = 0.4, min_size: int = 16, max_clusters: int = 128,
                 keep_prompts: bool = False, max_prompts: int = 256, clock=time.time):
        if not 0.0 < similarity < 1.0:
            raise ValueError(f"similarity must be in (0, 1), got {similarity}")
        self.similarity, self.min_size, self.max_clusters = similarity, max(1, min_size), max(2, max_clusters)
        self.keep_prompts, self.max_prompts, self.clock = keep_prompts, max(1, max_prompts), clock
        self.clusters: dict[int, Cluster] = {}
        self.recorded = 0  # prompts seen, ever
        self.forgotten = 0  # clusters dropped to stay within max_clusters
        self._next_id = 1
        self._lock = threading.Lock()
        self.on_record = None  # called after each record (the server's Prometheus counter)

    def record_unrouted(self, features: torch.Tensor, prompt: str | None = None) -> int:
        """Add one unrouted prompt (`features`: the router's feature vector for it); returns the
        id of the cluster it joined."""
        x = features.detach().float().flatten().cpu()
        x = x / x.norm().clamp(min=1e-12)
        now = self.clock()
        with self._lock:
            if self.clusters and next(iter(self.clusters.values())).total.shape != x.shape:
                self.clusters.clear()  # another feature space (a different router): start again
            best = self._nearest(x)
            if best is None:
                best = Cluster(self._next_id, x.clone(), 0, now, now, prompts=deque(maxlen=self.max_prompts))
                self.clusters[best.id] = best
                self._next_id += 1
            else:
                best.total += x
            best.size += 1
            best.last_seen = now
            if self.keep_prompts and prompt is not None:
                best.examples.append(prompt)
                best.prompts.append(prompt)
            best = self._merge(best)
            self._bound()
            self.recorded += 1
        if self.on_record is not None:
            self.on_record()
        return best.id

    def _nearest(self, x: torch.Tensor) -> Cluster | None:
        if not self.clusters:
            return None
        clusters = list(self.clusters.values())
        sims = torch.stack([c.direction for c in clusters]) @ x
        j = int(sims.argmax())
        return clusters[j] if float(sims[j]) >= self.similarity else None

    def _merge(self, cluster: Cluster) -> Cluster:
        """Fold the clusters that are the same task as `cluster` into the oldest of them; returns
        the survivor (`_same_task`)."""
        close = [c for c in self.clusters.values() if c is not cluster and _same_task(c, cluster)]
        if not close:
            return cluster
        group = sorted([cluster, *close], key=lambda c: c.id)
        keep = group[0]
        for other in group[1:]:
            keep.absorb(other)
            del self.clusters[other.id]
        return keep

    def _bound(self) -> None:
        while len(self.clusters) > self.max_clusters:
            drop = min(self.clusters.values(), key=lambda c: (c.size, c.last_seen))
            del self.clusters[drop.id]
            self.forgotten += 1

    def report(self) -> dict:
        """The clusters big enough to be a task shift, largest first, and the detector's state."""
        with self._lock:
            shifts = [self._describe(c) for c in sorted(self.clusters.values(), key=lambda c: -c.size)
                      if c.size >= self.min_size]
            return {"object": "list", "data": shifts, "unrouted": self.recorded, "clusters": len(self.clusters),
                    "forgotten": self.forgotten, "min_size": self.min_size, "similarity": self.similarity,
                    "keep_prompts": self.keep_prompts}

    def _describe(self, c: Cluster) -> dict:
        return {"id": f"c{c.id}", "object": "routing.shift", "size": c.size, "first_seen": _iso(c.first_seen),
                "last_seen": _iso(c.last_seen), "examples": list(c.examples), "prompts_kept": len(c.prompts)}

    def shift_count(self) -> int:
        with self._lock:
            return sum(c.size >= self.min_size for c in self.clusters.values())

    def prompts(self, cluster_id: str) -> list[str]:
        """The prompts kept for a cluster ("c3" or "3"); KeyError for an unknown one."""
        key = cluster_id[1:] if cluster_id.startswith("c") else cluster_id
        with self._lock:
            if not key.isdigit() or int(key) not in self.clusters:
                raise KeyError(cluster_id)
            return list(self.clusters[int(key)].prompts)
