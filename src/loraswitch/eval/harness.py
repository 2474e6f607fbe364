"""`run_eval`: build the prompts, run every requested method on them, score, aggregate, write.

Methods run one after another; each is timed on its answers only (model building, merging and
X-LoRA's classifier training are reported separately as `setup_s`). A method that cannot run
(a router that was never trained, a missing package) is recorded as unavailable with the reason
and the rest still run. Output: `results.json`, `records.json` (every output), `results.md`
and the PNG plots (see `report`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loraswitch.base import Base, load_base
from loraswitch.eval.data import OOS_SET, TASK_SET, Item, build_items
from loraswitch.eval.methods import EvalContext
from loraswitch.eval.registry import registry
from loraswitch.eval.scoring import aggregate, routing_targets, score_item
from loraswitch.eval.suite import Suite

DEFAULT_METHODS = (
    "base", "oracle", "auto", "seq", "arrow", "gate", "gate_meteora",
    "merge_linear", "merge_ties", "merge_dare_ties", "merge_pcb",
    "peft_linear", "peft_ties", "peft_dare_ties", "peft_cat", "peft_arrow", "peft_xlora",
)
# about a minute on a 2-core CPU (after the base model's one-time GGUF dequantisation)
QUICK = {"methods": ("base", "oracle", "auto", "arrow", "merge_linear"), "limit": 2, "composite_sizes": (2,),
         "composite_limit": 2, "oos_limit": 4, "max_new_tokens": 24, "part_tokens": 20}


@dataclass
class EvalConfig:
    suite: Suite | None = None  # the task suite (required; the CLI passes the --library's)
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    tasks: list[str] | None = None  # default: every task of the suite
    limit: int = 20  # test prompts per task
    composite_limit: int | None = None  # prompts per composite size (default: limit)
    oos_limit: int | None = None  # out-of-suite prompts (default: 2 * limit)
    composite_sizes: tuple[int, ...] | None = None  # default: the suite's
    freeform_limit: int = 0  # free-form composites per layout and size (issue 13; demo suite)
    xlora_limit: int = 4  # X-LoRA has no KV cache: at most this many prompts per task / per set
    max_new_tokens: int = 40
    part_tokens: int = 32  # composite budget: part_tokens per part + 8
    batch_size: int = 16
    out_dir: Path = Path("eval_results")
    base: str | None = None  # model spec for load_base (None: the embedded default)
    adapter_dirs: list[Path] | None = None  # default: the demo adapters
    router_dir: Path | None = None  # default: the demo routers
    quick: bool = False
    heatmap_prompts: int = 3
    seed: int = 0
    progress: bool = True
    # reuse the methods a run into the same out_dir already finished on the same prompts (its
    # files are rewritten after every method, so an interrupted run loses one method at most)
    resume: bool = False
    xlora_train_per_adapter: int = 40
    xlora_epochs: int = 3

    @classmethod
    def quick_config(cls, **overrides) -> EvalConfig:
        cfg = {**QUICK, "quick": True, "xlora_train_per_adapter": 4, "xlora_epochs": 1}
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        cfg["methods"] = list(cfg["methods"])
        return cls(**cfg)


def _cap_items(items: list[Item], cap: int) -> list[Item]:
    """At most `cap` items per task (single-task prompts) and per set (composites, oos)."""
    seen: dict[str, int] = {}
    out = []
    for it in items:
        key = f"{it.set}:{it.task}" if it.set == TASK_SET else it.set
        if seen.get(key, 0) < cap:
            out.append(it)
            seen[key] = seen.get(key, 0) + 1
    return out


def _check_adapters_match(adapter_dirs: list[Path], tasks: list[str], suite: str) -> None:
    """A suite scores its tasks with the adapters named after them: a library whose adapters match
    none of them would be scored as if every answer were the base model's, and reported as a
    valid run (a black-box review ran `eval --adapter-dir` on its own renamed adapters)."""
    from loraswitch.library import find_adapter_dirs

    names = {p.name for d in adapter_dirs for p in find_adapter_dirs(d)}
    if names and not names & set(tasks):
        raise ValueError(f"the adapters in {', '.join(map(str, adapter_dirs))} ({', '.join(sorted(names))}) match none "
                         f"of the {suite} suite's tasks ({', '.join(tasks)}): `loraswitch eval` scores a suite's tasks "
                         "with the adapters named after them; it has no suite made of your own example files")


def run_eval(cfg: EvalConfig, base_factory: Callable[[], Base] | None = None,
             on_method: Callable[[str, dict], None] | None = None) -> dict:
    """Run the evaluation and write its files to `cfg.out_dir`; returns the results dict."""
    from loraswitch.constants import DEMO_ADAPTER_DIR
    from loraswitch.eval.report import write_report

    if cfg.suite is None:
        raise ValueError("EvalConfig.suite is required: the task suite to evaluate on")
    suite = cfg.suite
    tasks = list(cfg.tasks or suite.task_names)
    reg = registry()
    unknown = [m for m in cfg.methods if m not in reg]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(reg)}")
    factory = base_factory or (lambda: load_base(cfg.base))
    adapter_dirs = [Path(d) for d in (cfg.adapter_dirs or [DEMO_ADAPTER_DIR])]
    _check_adapters_match(adapter_dirs, tasks, suite.name)
    oos_limit = cfg.oos_limit if cfg.oos_limit is not None else 2 * cfg.limit
    items = build_items(suite, tasks, cfg.limit, cfg.composite_sizes, cfg.composite_limit, oos_limit,
                        cfg.max_new_tokens, cfg.part_tokens, cfg.seed, cfg.freeform_limit)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "suite": suite.name, "tasks": tasks,
            "config": _jsonable({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "suite"}),
            "adapter_dirs": [str(d) for d in adapter_dirs], "torch_threads": torch.get_num_threads(),
            "files": _fingerprint([*adapter_dirs, *([Path(cfg.router_dir)] if cfg.router_dir else [])]),
            "platform": platform.platform(), "n_items": {s: sum(1 for i in items if i.set == s) for s in sorted({i.set for i in items})},
        },
        "methods": {},
    }
    all_records: dict[str, list[dict]] = {}
    done = _finished_methods(out_dir, items, results["meta"]) if cfg.resume else {}
    # saved records keep no traces: the reused methods' heatmap traces come from the last results
    kept_heatmaps = _saved(out_dir).get("heatmaps", {}) if done else {}
    if done:  # the reused answers date from the run that made them; this run only resumed it
        results["meta"]["resumed"] = results["meta"]["started"]
        results["meta"]["started"] = _saved(out_dir).get("meta", {}).get("started", results["meta"]["started"])
    order = sorted(cfg.methods, key=lambda m: ("reference", "router", "merge", "peft").index(reg[m].family))
    shared_last = max((i for i, m in enumerate(order) if reg[m].family in ("reference", "router")), default=-1)
    with tempfile.TemporaryDirectory(prefix="loraswitch-eval-") as scratch:
        ctx = EvalContext(factory, adapter_dirs, tasks, cfg.router_dir, cfg.batch_size, cfg.quick,
                          scratch=Path(scratch), xlora_train_per_adapter=cfg.xlora_train_per_adapter,
                          xlora_epochs=cfg.xlora_epochs, suite=suite)
        for pos, name in enumerate(order):
            spec = reg[name]
            entry, records = done[name] if name in done else _run_method(spec, ctx, items, cfg)
            results["methods"][name] = entry
            all_records[name] = records
            _write_files(out_dir, results, items, all_records)
            if on_method is not None:
                on_method(name, entry)
            if ctx._switch is not None:
                results["meta"]["adapters"] = ctx._switch.engine.names
            if pos == shared_last:
                ctx._switch = None  # free the shared engine before merges and PEFT build their own
    results["meta"].setdefault("adapters", sorted({a for r in results["methods"].values() for a in r.get("info", {}).get("adapters", [])}))
    results["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["heatmaps"] = {**{m: h for m, h in kept_heatmaps.items() if m in done},
                           **_heatmap_traces(all_records, items, cfg.heatmap_prompts)}
    results["routing_targets"] = routing_targets(results["methods"])
    _write_files(out_dir, results, items, all_records)
    write_report(results, out_dir)
    return results


def _write_files(out_dir: Path, results: dict, items: list[Item], all_records: dict[str, list[dict]]) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "records.json").write_text(json.dumps(
        {"items": [i.to_dict() for i in items], "records": {m: [{k: v for k, v in r.items() if k != "trace"} for r in rs]
                                                           for m, rs in all_records.items()}}, indent=1) + "\n")


def _saved(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


# the settings that change answers: a resumed run reuses nothing when one of them differs
ANSWER_SETTINGS = ("base", "router_dir", "max_new_tokens", "part_tokens", "batch_size", "quick", "xlora_limit",
                   "xlora_train_per_adapter", "xlora_epochs")


def _finished_methods(out_dir: Path, items: list[Item], meta: dict) -> dict[str, tuple[dict, list[dict]]]:
    """(entry, records) of each method an earlier run into `out_dir` finished without error, if
    it asked exactly these prompts with the same settings and the same adapter and router files;
    nothing otherwise (a changed suite, limit, seed, token budget, base or library reruns all,
    and says why)."""
    results = _saved(out_dir)
    try:
        saved = json.loads((out_dir / "records.json").read_text())
    except (OSError, ValueError):
        return {}
    old = results.get("meta", {})
    changed = [k for k in ANSWER_SETTINGS if old.get("config", {}).get(k) != meta["config"].get(k)]
    changed += ["adapter_dirs"] if old.get("adapter_dirs") != meta["adapter_dirs"] else []
    changed += ["the adapter / router files"] if old.get("files", meta["files"]) != meta["files"] else []
    if [i.get("prompt") for i in saved.get("items", [])] != [i.prompt for i in items]:
        changed.append("the prompts (suite, tasks, limits or seed)")
    if changed:
        if results.get("methods"):
            warnings.warn(f"--resume: every method runs again: {', '.join(changed)} changed since the run in {out_dir}",
                          stacklevel=2)
        return {}
    return {m: (entry, saved["records"][m]) for m, entry in results.get("methods", {}).items()
            if entry.get("status") == "ok" and m in saved.get("records", {})}


def _fingerprint(dirs: list[Path]) -> str:
    """A hash of every file under `dirs` (adapters, routers): a resumed run must not reuse
    answers given by other weights."""
    digest = hashlib.sha1()
    for d in dirs:
        for f in sorted(p for p in Path(d).rglob("*") if p.is_file()) if Path(d).is_dir() else ():
            digest.update(str(f.relative_to(d)).encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def _run_method(spec, ctx: EvalContext, items: list[Item], cfg: EvalConfig) -> tuple[dict, list[dict]]:
    method = spec.factory(ctx)
    mine = [it for it in items if method.needs_oos or it.set != OOS_SET]
    if spec.name == "peft_xlora":
        mine = _cap_items(mine, min(cfg.xlora_limit, max(cfg.limit, 1)))
    entry: dict = {"family": spec.family, "description": spec.description, "status": "ok", "n_items": len(mine)}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            method.setup()
    except Exception as exc:  # a method that cannot run is reported, never fatal
        entry.update(status="unavailable", error=f"{type(exc).__name__}: {exc}", info=method.info)
        method.close()
        return entry, []
    entry["setup_s"] = round(time.perf_counter() - t0, 2)
    bar = tqdm(total=len(mine), desc=f"eval {spec.name}", unit="prompt", disable=not cfg.progress, leave=False)
    ctx.progress = bar.update
    t1 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            answers = method.answer(mine)
    except Exception as exc:
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=6),
                     info=method.info)
        return entry, []
    finally:
        wall = time.perf_counter() - t1
        bar.close()
        ctx.progress = lambda n: None
        method.close()
    records = []
    for it, a in zip(mine, answers):
        rec = score_item(it, a, method.routes, ctx.suite)
        if it.is_composite:
            rec["trace"] = [{"token": e.get("token", ""), "adapters": e.get("adapters", {}),
                             **({"separator": True} if e.get("separator") else {})} for e in a.trace]
        records.append(rec)
    n_tok = sum(len(a.token_ids) for a in answers)
    entry.update(wall_s=round(wall, 2), gen_tokens=n_tok, tokens_per_s=round(n_tok / wall, 1) if wall > 0 else None,
                 info=method.info, routes=method.routes, **aggregate(records, ctx.tasks, method.routes))
    return entry, records


def _heatmap_traces(all_records: dict[str, list[dict]], items: list[Item], n: int) -> dict:
    """Per-token traces of the first `n` composite prompts, for methods whose traces name adapters."""
    comp_ids = [i.id for i in items if i.is_composite][:n]
    prompts = {i.id: i.prompt for i in items}
    out = {}
    for method, recs in all_records.items():
        picked = [r for r in recs if r["id"] in comp_ids and any(e["adapters"] for e in r.get("trace", []))]
        if picked:
            out[method] = [{"id": r["id"], "prompt": prompts[r["id"]], "output": r["output"], "trace": r["trace"],
                            "parts": [{"task": p["task"], "chosen": p.get("chosen")} for p in r["parts"]]} for r in picked]
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
