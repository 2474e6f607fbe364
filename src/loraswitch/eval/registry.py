"""Every method the harness can run, by name, listed explicitly: the reference and router methods
(`methods`), one `merge_<m>` per method `loraswitch.merging` offers, and PEFT's baselines
(`peft_baselines`). Explicit rather than registered by import side effects, so the method
modules never import each other in a circle."""

from __future__ import annotations

from loraswitch.eval.methods import REFERENCE_METHODS, ROUTER_METHODS, MergeMethod, MethodSpec
from loraswitch.eval.peft_baselines import PEFT_METHODS

FAMILY_ORDER = ("reference", "router", "merge", "peft")


def merge_method_names() -> list[str]:
    """Methods offered by `loraswitch.merging`, discovered at call time: a method registered there
    is evaluated here without further changes."""
    from loraswitch.merging.config import known_methods

    return list(known_methods())


def registry() -> dict[str, MethodSpec]:
    """Every method by name, in family order (reference, router, merge, peft)."""
    merges = [MethodSpec(f"merge_{m}", "merge", lambda ctx, _m=m: MergeMethod(ctx, _m),
                         f"loraswitch.merging {m} of all adapters (equal weights)") for m in merge_method_names()]
    specs = [*REFERENCE_METHODS, *ROUTER_METHODS, *merges, *PEFT_METHODS]
    return {s.name: s for s in sorted(specs, key=lambda s: (FAMILY_ORDER.index(s.family), s.name))}
