"""What the replicas share: the library's changes and their own reports, held by one small
actor (`Library`) that every replica polls.

POST/DELETE /v1/adapters are answered by one replica (its validation, its errors) and then
appended here as numbered operations; each replica applies those it has not seen through its own
app between batches, so in-flight requests finish with the library they started with, and the
ingress waits until every live replica has acknowledged. A replica that Serve restarts replays
the whole log before it serves, so hot-loaded adapters survive a crash. The replicas also post
their Prometheus text and health here (the heartbeat that says which replicas are live), which
`/metrics` and `/healthz` on the ingress aggregate.
"""

from __future__ import annotations

import time

LIBRARY_ACTOR = "loraswitch-library"
LIVE_S = 5.0  # a replica that has not reported for this long is not waited for


class Library:
    """The cluster's library log and the replicas' last reports (a Ray actor: `ray.remote(Library)`)."""

    def __init__(self):
        self.ops: list[dict] = []  # {"op": "load", "body": {...}} | {"op": "remove", "name": ...}
        self.reports: dict[str, dict] = {}  # replica id -> {"at", "version", "metrics", "health"}

    def append(self, op: dict) -> int:
        """Record a library change; returns the version every replica must reach."""
        self.ops.append(op)
        return len(self.ops)

    def since(self, version: int) -> list[dict]:
        return self.ops[version:]

    def report(self, replica: str, version: int, metrics: bytes = b"", health: dict | None = None) -> None:
        self.reports[replica] = {"at": time.time(), "version": version, "metrics": metrics, "health": health or {}}

    def live(self) -> dict[str, dict]:
        now = time.time()
        return {r: rep for r, rep in self.reports.items() if now - rep["at"] < LIVE_S}

    def behind(self, version: int) -> list[str]:
        """Live replicas that have not applied the log up to `version` yet."""
        return sorted(r for r, rep in self.live().items() if rep["version"] < version)


def merge_metrics(reports: dict[str, bytes]) -> str:
    """One Prometheus exposition from the replicas' own: each sample gets a `replica` label and
    each metric family is written once, its samples from all replicas together (the format
    requires a family's lines to be contiguous)."""
    families: dict[str, dict] = {}
    for replica, text in sorted(reports.items()):
        family = None
        for line in text.decode().splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split()[2]
                fam = families.setdefault(family, {"meta": [], "samples": []})
                if line not in fam["meta"]:
                    fam["meta"].append(line)
            elif line and not line.startswith("#"):
                fam = families.setdefault(family or line.split("{")[0].split()[0], {"meta": [], "samples": []})
                fam["samples"].append(labelled(line, replica))
    return "".join("\n".join(f["meta"] + f["samples"]) + "\n" for f in families.values())


def labelled(sample: str, replica: str) -> str:
    """'name{a="b"} 1' -> 'name{replica="r",a="b"} 1'; 'name 1' -> 'name{replica="r"} 1'."""
    label = f'replica="{replica}"'
    name, sep, rest = sample.partition("{")
    if sep and " " not in name:
        return f"{name}{{{label}{'' if rest.startswith('}') else ','}{rest}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{label}}} {value}"
