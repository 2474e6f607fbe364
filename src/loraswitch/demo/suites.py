"""The two task suites as `loraswitch.eval.suite.Suite`s: the synthetic demo suite and the
BIG-bench suite. `suite_for(library)` is what the `eval` command is given to map `--library` to
its suite; both share the numbered-answer reading (`loraswitch.numbered`) and the generic
out-of-suite prompts."""

from __future__ import annotations

from loraswitch.eval.suite import Case, CompositeCase
from loraswitch.numbered import parse_numbered


class DemoSuite:
    """The eight synthetic tasks: template wording (held-out templates in test), exact answers,
    composites of 2, 3 and 5 parts as a numbered list."""

    name = "demo"
    composite_sizes = (2, 3, 5)

    @property
    def task_names(self) -> tuple[str, ...]:
        from loraswitch.demo.tasks import TASK_NAMES

        return TASK_NAMES

    def examples(self, task: str, split: str, n: int, seed: int = 0) -> list[Case]:
        from loraswitch.demo.tasks import examples

        return [_case(e) for e in examples(task, split, n, seed=seed)]

    def score(self, case: Case, output: str) -> bool:
        from loraswitch.demo.tasks import score

        return score(case.task, output, case.answer)

    def composites(self, tasks: list[str], n_parts: int, count: int, seed: int = 0) -> list[CompositeCase]:
        """The suite's own composites, from the evaluated tasks only."""
        from loraswitch.demo.tasks import composites

        if n_parts > len(tasks):
            return []
        return [CompositeCase(c.prompt, tuple(_case(p) for p in c.parts))
                for c in composites(n_parts, count, "test", seed, tasks=tasks)]

    def parse_parts(self, output: str, n_parts: int) -> list[str]:
        return parse_numbered(output, n_parts)

    def freeform(self, tasks: list[str], n_parts: int, count: int, seed: int = 0) -> list[tuple[str, CompositeCase]]:
        """Free-form composites (`demo.tasks.freeform`, issue 13): `count` per layout, as
        (layout group "train" or "heldout", case); the group says whether the segmenter was
        tuned on the layout."""
        from loraswitch.demo.tasks.freeform import freeform

        if n_parts > len(tasks):
            return []
        return [("heldout" if c.heldout else "train", CompositeCase(c.prompt, tuple(_case(p) for p in c.parts)))
                for heldout in (False, True) for c in freeform(n_parts, count, heldout, "test", seed, tasks=tasks)]

    def out_of_suite(self, split: str, n: int, seed: int = 0) -> list[str]:
        from loraswitch.demo.tasks import out_of_suite

        return out_of_suite(split, n, seed)


class BigBenchSuite(DemoSuite):
    """The ten BIG-bench tasks (`loraswitch.demo.bigbench`): BIG-bench's metric in generative
    form, MeteoRA's composite-3/5/10 sets and format. Out-of-suite prompts are the demo's, the
    router's bundled generic ones: open requests and near misses of other tasks than these."""

    name = "bigbench"
    composite_sizes = (3, 5, 10)

    @property
    def task_names(self) -> tuple[str, ...]:
        from loraswitch.demo.bigbench.tasks import TASK_NAMES

        return TASK_NAMES

    def examples(self, task: str, split: str, n: int, seed: int = 0) -> list[Case]:
        from loraswitch.demo.bigbench.tasks import examples

        return [_case(e) for e in examples(task, split, n, seed=seed)]

    def score(self, case: Case, output: str) -> bool:
        from loraswitch.demo.bigbench.metrics import score

        return score(output, case.targets or (case.answer,))

    def composites(self, tasks: list[str], n_parts: int, count: int, seed: int = 0) -> list[CompositeCase]:
        """MeteoRA's fixed task set for `n_parts`; none when a task of the set is not evaluated."""
        from loraswitch.demo.bigbench.composites import COMPOSITE_SETS, composite_parts

        if n_parts not in COMPOSITE_SETS or not set(COMPOSITE_SETS[n_parts]) <= set(tasks):
            return []
        return [CompositeCase(prompt, tuple(_case(p) for p in parts))
                for prompt, parts in composite_parts(n_parts, count, seed)]


def _case(e) -> Case:
    """A demo or BIG-bench example as an eval `Case`."""
    return Case(e.task, e.prompt, e.answer, getattr(e, "targets", (e.answer,)),
                getattr(e, "heldout_template", None), getattr(e, "seen_payload", None))


SUITES = {"demo": DemoSuite, "bigbench": BigBenchSuite}


def suite_for(library: str):
    """The task suite of an embedded library; a ValueError names the libraries, and for bigbench a
    BigBenchDataError (a RuntimeError) says how to fetch its data."""
    if library not in SUITES:
        raise ValueError(f"no task suite for library {library!r}; suites: {', '.join(SUITES)}")
    if library == "bigbench":
        from loraswitch.demo.bigbench.fetch import require

        require()
    return SUITES[library]()
