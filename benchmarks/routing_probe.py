#!/usr/bin/env python
"""Does `auto` abstain on near misses, and still route new wordings of the library's own tasks?

    python benchmarks/routing_probe.py --library demo --doc docs/routing.md
    python benchmarks/routing_probe.py --library bigbench --doc docs/routing.md
    python benchmarks/routing_probe.py --library demo --sweep --doc docs/routing.md

The probe sets (`benchmarks/probes/<library>_<set>_{nearmiss,intask}.txt`) are prompts written
for this by people, not drawn from any generator the routers train on. A *near miss* looks like
one of the library's tasks and asks something else ("Multiply 12 by 7" beside an addition
adapter, "Translate to German: ..." beside a French one), or is ordinary chat: the router should
send it to no adapter. An *in-task* line (`adapter<TAB>prompt`) asks for exactly one adapter's
task in a wording of its own. Three sets, by how much they steered the router's design:
`dev` (near misses only, demo: written by the engineer while changing the router), `heldout`
(written by a colleague before the change, then looked at while choosing its settings) and
`sealed` (written by another colleague and read only by this script, after the settings were
chosen). Read the sealed set's numbers as the honest ones, and of those the near misses that fill
no bundled `__none__` template (`routing.generic.fills_a_template`): some people's phrasings ("Is
221 a prime number?") are one of the templates with its slots filled.

Default mode: the library's committed router deciding whole prompts as `auto` does (no
segmentation), on every set, and on the suite's own test prompts. `--sweep`: the trade-off behind the router's settings. One feature pass
over the training prompts, a pool of bundled `__none__` prompts with and without near misses, and
the probes; then, for each weight decay and abstain-threshold ceiling, both heads fitted 5 times
on different draws of 2,000 bundled prompts (`routing.seq.fit_selector`), and a row for the
router as it was before (open requests only, free temperature, ceiling 0.9). Writes
benchmarks/results/routing_probe_<library>[_sweep].{json,md} (and a PNG for the sweep).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import typer

HERE = Path(__file__).resolve().parent
PROBES, OUT = HERE / "probes", HERE / "results"
SETS = ("dev", "heldout", "sealed")


def load_probes(library: str) -> dict[str, dict]:
    """{set: {"nearmiss": [prompt], "intask": [(adapter, prompt)]}} for the sets that exist."""
    out: dict[str, dict] = {}
    for name in SETS:
        near, intask = PROBES / f"{library}_{name}_nearmiss.txt", PROBES / f"{library}_{name}_intask.txt"
        if near.is_file() or intask.is_file():
            out[name] = {"nearmiss": _lines(near), "intask": [_labelled(intask, i, line) for i, line in enumerate(_lines(intask), 1)]}
    if not out:
        raise SystemExit(f"no probe sets for library {library!r} in {PROBES} (<library>_<set>_nearmiss.txt / _intask.txt)")
    return out


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []


def _labelled(path: Path, number: int, line: str) -> tuple[str, str]:
    adapter, tab, prompt = line.partition("\t")
    if not tab or not adapter or not prompt:
        raise SystemExit(f"{path}:{number}: expected 'adapter<TAB>prompt', got {line[:60]!r}")
    return adapter, prompt


def score(near: list[str], near_got: list, intask: list[tuple[str, str]], intask_got: list) -> dict:
    """Near misses abstained on (all, and those that fill none of the bundled `__none__`
    templates: `generic.fills_a_template`), in-task prompts routed right / abstained / elsewhere."""
    from loraswitch.routing.generic import fills_a_template

    right = [g == want for (want, _), g in zip(intask, intask_got)]
    unlike = [g for p, g in zip(near, near_got) if not fills_a_template(p)]
    return {
        "nearmiss": len(near_got), "nearmiss_abstained": sum(g is None for g in near_got),
        "nearmiss_unlike_templates": len(unlike), "nearmiss_unlike_abstained": sum(g is None for g in unlike),
        "nearmiss_sent_to": dict(Counter(g for g in near_got if g is not None).most_common()),
        "intask": len(intask), "intask_right": sum(right), "intask_abstained": sum(g is None for g in intask_got),
        "intask_wrong": [{"want": w, "got": g, "prompt": p[:90]} for (w, p), g, ok in zip(intask, intask_got, right) if not ok],
    }


def suite_cases(library: str, n: int = 30):
    from loraswitch.demo.suites import suite_for

    suite = suite_for(library)
    return [c for t in suite.task_names for c in suite.examples(t, "test", n, seed=0)]


def route_committed(library: str, router_dir: Path | None, router: str) -> dict:
    """The committed router on every probe set and on the suite's test prompts."""
    from loraswitch.console import open_switch

    switch = open_switch(None, None, router_dir, library=library)
    chosen = switch.router(router)
    adapters = lambda prompts: [d.adapter for d in chosen.route(switch.engine, prompts)] if prompts else []  # noqa: E731
    result = {"library": library, "router": chosen.name, "note": getattr(chosen, "note", None) or None, "sets": {}}
    for name, probe in load_probes(library).items():
        near, intask = adapters(probe["nearmiss"]), adapters([p for _, p in probe["intask"]])
        result["sets"][name] = score(probe["nearmiss"], near, probe["intask"], intask)
    cases = suite_cases(library)
    got = adapters([c.prompt for c in cases])
    ok = [g == c.task for g, c in zip(got, cases)]
    held = [o for o, c in zip(ok, cases) if getattr(c, "heldout_template", False)]
    result["suite_test"] = {"prompts": len(cases), "right": sum(ok), "heldout_wording": len(held), "heldout_right": sum(held),
                            "fast_head_decides": _fast_decides(chosen, switch.engine, [c.prompt for c in cases])}
    return result


def _fast_decides(router, engine, prompts: list[str]) -> int | None:
    """How many of `prompts` the selector's fast head sends to an adapter (the rest cost the main
    head's pass too: what `auto` pays, issue 17); None without a fast head."""
    from loraswitch.routing.features import prompt_features

    fast = getattr(getattr(router, "inner", router), "fast", None)
    if fast is None:
        return None
    return sum(d.adapter is not None for d in fast.route_features(engine, prompt_features(engine, prompts, fast.layer)))


def route_report(r: dict) -> str:
    lines = [f"`{r['router']}` router of the {r['library']} library (`python benchmarks/routing_probe.py --library "
             f"{r['library']}`):", "",
             "| probe set | near misses abstained | of them filling no bundled template | near misses sent to | in-task routed right | in-task abstained |",
             "|---|---|---|---|---|---|"]
    for name, s in r["sets"].items():
        sent = ", ".join(f"{k} {v}" for k, v in list(s["nearmiss_sent_to"].items())[:4]) or "–"
        near = f"{s['nearmiss_abstained']} / {s['nearmiss']}" if s["nearmiss"] else "–"
        unlike = f"{s['nearmiss_unlike_abstained']} / {s['nearmiss_unlike_templates']}" if s["nearmiss"] else "–"
        intask = f"{s['intask_right']} / {s['intask']}" if s["intask"] else "–"
        lines.append(f"| {name} | {near} | {unlike} | {sent} | {intask} | {s['intask_abstained'] if s['intask'] else '–'} |")
    t = r["suite_test"]
    held = f", held-out wording {t['heldout_right']} / {t['heldout_wording']}" if t["heldout_wording"] else ""
    fast = f"; the fast head decided {t['fast_head_decides']} of them" if t.get("fast_head_decides") is not None else ""
    lines += ["", f"The suite's own test prompts: {t['right']} / {t['prompts']} routed right{held}{fast}."]
    if r.get("note"):
        lines += ["", f"Note: {r['note']}"]
    return "\n".join(lines)


def main(library: str = "demo", router: str = "auto", router_dir: Path | None = None, sweep: bool = False,
         data: Path | None = None, draws: int = 5, doc: Path | None = None) -> None:
    """Probe the committed router (default) or sweep the settings behind it (`--sweep`)."""
    from loraswitch.eval.report import update_doc

    if sweep:
        from routing_probe_sweep import sweep_main

        return sweep_main(library, data, draws, doc)
    result = route_committed(library, router_dir, router)
    OUT.mkdir(exist_ok=True)
    (OUT / f"routing_probe_{library}.json").write_text(json.dumps(result, indent=1) + "\n")
    body = route_report(result)
    (OUT / f"routing_probe_{library}.md").write_text(body + "\n")
    print(body)
    if doc is not None:
        update_doc(doc, f"routing-probe-{library}", body)


if __name__ == "__main__":
    typer.run(main)
