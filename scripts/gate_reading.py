"""How the demo's learned gates read prompts, on the demo's validation split (never the test
split the eval reports): the numbers docs/routing.md (`gate`) quotes for choosing how the gates
are trained and how a line is read. No generation, only the gates' reading forward.

    python scripts/gate_reading.py                      # the committed demo gates
    python scripts/gate_reading.py --gates DIR --plain  # other gates; lines read by plain sums
    python scripts/gate_reading.py --teacher            # what the layers vote under a forced adapter
    python scripts/gate_reading.py --library bigbench   # BIG-bench: single-task test prompts read as several parts

Per single-task prompt: is the plan's first adapter the task. Per composite (2, 3, 5 parts): is
the plan exactly the parts' tasks, and how many parts are in place. `--teacher`: for 16 training
prompts of `num_to_english` and of `num_to_french`, the share of layers whose gate names each
adapter at the last prompt token, while the model applies English, French or no adapter.
`--library bigbench`: the eval's single-task test prompts (`--n` per task), how many are read as
one part and how many as several (the plans `routing.cues` would answer part by part only if
the prompt listed those parts), how often the plan's first adapter is the task, and how many ask
question blocks (`units.question_blocks`: those would be answered part by part); then the eval's
first `--composites` MeteoRA-format composite-3 / -5 / -10 prompts: how many plans have one
part per question, and how many parts are in place.
"""

from __future__ import annotations

import argparse
import collections

import torch


def plans(router, engine, prompts: list[str]) -> list[list[str | None]]:
    from loraswitch.routing.segments import SegmentPolicy

    policy = SegmentPolicy(router, engine, prompts, cues=False)
    policy.start(engine, [engine.base.chat_ids(p) for p in prompts])
    return [[engine.name_of(s) if s >= 0 else None for s in plan] for plan in policy.plans]


def reading(router, engine, n: int) -> None:
    from loraswitch.demo.tasks import TASK_NAMES, composites, examples

    right = {}
    for task in TASK_NAMES:
        cases = examples(task, "val", n)
        right[task] = sum(p[:1] == [task] for p in plans(router, engine, [c.prompt for c in cases]))
    print(f"single-task plans right: {sum(right.values())} / {n * len(TASK_NAMES)}  {right}")
    for k in (2, 3, 5):
        cases = composites(k, 10, "val")
        got = plans(router, engine, [c.prompt for c in cases])
        want = [[p.task for p in c.parts] for c in cases]
        exact = sum(g == w for g, w in zip(got, want))
        placed = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
        print(f"composite-{k}: plans exact {exact} / 10, parts in place {placed} / {10 * k}")


def bigbench(router, engine, n: int, composites: int) -> None:
    from loraswitch.demo.bigbench.composites import composite_parts
    from loraswitch.demo.bigbench.tasks import TASK_NAMES, examples
    from loraswitch.routing.units import question_blocks

    sizes: collections.Counter = collections.Counter()
    first = blocked = 0
    for task in TASK_NAMES:
        prompts = [e.prompt for e in examples(task, "test", n)]
        got = plans(router, engine, prompts)
        sizes.update(len(p) for p in got)
        first += sum(p[:1] == [task] for p in got)
        blocked += sum(bool(question_blocks(p)) for p in prompts)
    print(f"single-task test prompts by plan length: {dict(sorted(sizes.items()))}; "
          f"plan's first adapter is the task: {first} / {n * len(TASK_NAMES)}; "
          f"asked as question blocks (answered part by part): {blocked}")
    for k in (3, 5, 10):
        cases = composite_parts(k, composites)
        got = plans(router, engine, [p for p, _ in cases])
        want = [[e.task for e in parts] for _, parts in cases]
        placed = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
        there = sum(a == b for g, w in zip(in_place(router, engine, [p for p, _ in cases]), want) for a, b in zip(g, w))
        print(f"composite-{k} (MeteoRA format): plans of the right length {sum(len(g) == k for g in got)} / "
              f"{len(cases)}, exact {sum(g == w for g, w in zip(got, want))}, parts in place {placed} / {k * len(cases)} "
              f"(questions read where the prompt asks them instead of alone: {there})")


def in_place(router, engine, prompts: list[str]) -> list[list[str | None]]:
    """Each question block's adapter as the gates read it inside the whole prompt, after the
    worked examples and the questions before it (the plan reads each question alone)."""
    from loraswitch.routing.segments import SegmentPolicy, question_label

    policy = SegmentPolicy(router, engine, prompts, cues=False)
    ids = [engine.base.chat_ids(p) for p in prompts]
    out = []
    for row, mass in enumerate(router.read(engine, ids)):
        user = policy._user(ids[row], mass, row)
        labels = [question_label(user[a:b]) for (a, b), _ in policy._question_spans(row, user.shape[0])]
        out.append([engine.name_of(lab - 1) if lab else None for lab in labels])
    return out


def teacher(router, engine) -> None:
    from loraswitch.demo.router_data import demo_pairs
    from loraswitch.kernels import Routing
    from loraswitch.padding import left_pad

    data, columns = demo_pairs("train", 200), ["no adapter", *router.names]
    for task in ("num_to_english", "num_to_french"):
        ids = [engine.base.chat_ids(p) for p, _ in data[task][:16]]
        batch = left_pad(ids, engine.base.tokenizer.pad_token_id)
        for forced in ("num_to_english", "num_to_french", None):
            n = len(ids) * batch.width
            applied = Routing(torch.full((n, 1), engine.slots[forced] if forced else -1), torch.ones(n, 1))
            votes: collections.Counter = collections.Counter()

            def record(key, x, _votes=votes, _applied=applied, _shape=(len(ids), batch.width)):
                scores, _ = router.scores(key, x)
                _votes.update(columns[i] for i in scores.view(*_shape, -1)[:, -1].argmax(-1).tolist())
                return _applied

            with torch.inference_mode(), engine.routed(None, record):
                engine.model(**batch.model_inputs(), use_cache=False, logits_to_keep=1)
            total = sum(votes.values())
            shares = ", ".join(f"{k} {v / total:.0%}" for k, v in votes.most_common(3))
            print(f"{task} prompts, {forced or 'no adapter'} applied: {shares}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gates", help="folder of a gate_router.safetensors (default: the demo library's)")
    ap.add_argument("--n", type=int, default=20, help="validation prompts per task")
    ap.add_argument("--plain", action="store_true", help="read a line by its plain summed votes (the rule before the weighted one)")
    ap.add_argument("--teacher", action="store_true", help="also the layers' votes under a forced adapter")
    ap.add_argument("--composites", type=int, default=3, help="bigbench: MeteoRA-format composites per size (the eval's first ones)")
    ap.add_argument("--library", default="demo", help="demo (validation reading) or bigbench (single-task plans)")
    args = ap.parse_args()
    from loraswitch.constants import adapter_dir, router_dir
    from loraswitch.routing import segments
    from loraswitch.routing.gate import GateRouter
    from loraswitch.switch import Switch

    switch = Switch(adapter_dirs=[adapter_dir(args.library)], router_dir=router_dir(args.library))
    router = GateRouter.load(args.gates, switch.engine) if args.gates else switch.router("gate")
    if args.plain:
        def plain(labels, mass, line_starts):
            bounds = sorted({0, len(labels), *(i for i in line_starts if 0 < i < len(labels))})
            out = list(labels)
            for a, b in zip(bounds, bounds[1:]):
                if len(set(out[a:b])) > 1:
                    out[a:b] = [int(mass[a:b, 1:].sum(0).argmax()) + 1] * (b - a)
            return out

        segments._by_line = plain
    if args.library == "bigbench":
        bigbench(router, switch.engine, args.n, args.composites)
        return
    reading(router, switch.engine, args.n)
    if args.teacher:
        teacher(router, switch.engine)


if __name__ == "__main__":
    main()
