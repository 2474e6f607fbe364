"""The speed targets with their measured ratios, the markdown summary and the scaling plot."""

from __future__ import annotations

from pathlib import Path

from loraswitch.bench.config import BenchConfig


# ---------------------------------------------------------------------------- targets & report
def _get(r: dict, b: int, config: str, key: str = "decode_tok_s") -> float | None:
    v = r.get("batches", {}).get(str(b), {}).get(config, {})
    return v.get(key) if isinstance(v, dict) else None


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


SANITY_TOLERANCE = 0.05  # base and merged do the same arithmetic: a run where they differ more is noise
# ... and each of the two must itself hold still: two medians of runs that moved by 50% can land
# within 5% of each other by chance (a run on a machine with load average 4-8 did)
SANITY_SPREAD = 0.15


def sanity(model_result: dict, cfg: BenchConfig) -> list[dict]:
    """`base` vs `merged` decode per batch size: the same arithmetic, so their ratio measures the
    run's own noise. Within +-5%, and with neither one's runs spread by more than 15%, the run may
    judge targets; otherwise it says it is too noisy."""
    out = []
    for b in cfg.batch_sizes:
        ratio = _ratio(_get(model_result, b, "base"), _get(model_result, b, "merged"))
        if ratio is not None:
            spread = max(_get(model_result, b, c, "decode_spread") or 0.0 for c in ("base", "merged"))
            out.append({"batch": b, "base_vs_merged": ratio, "spread": spread,
                        "ok": abs(ratio - 1.0) <= SANITY_TOLERANCE and spread <= SANITY_SPREAD})
    return out


def targets(model_result: dict, cfg: BenchConfig) -> list[dict]:
    """The project's speed targets, each with the measured ratio (of medians) and met / NOT MET;
    `met` is None for every target when the sanity pair says the run is too noisy to judge."""
    out = _targets(model_result, cfg)
    checks = sanity(model_result, cfg)
    if checks and not all(c["ok"] for c in checks):
        for t in out:
            t["met"] = None
    return out


# issue 17: sequence-routed and one-adapter-per-request decode >= 0.95x merged weights, per-token
# top-1 >= 0.9x; on the eager loop and on the compiled step (`Engine(compile=True)`) alike
ROUTED_GOALS = (("ls_seq", "sequence-routed", 0.95), ("ls_mixed", "one adapter per request", 0.95),
                ("ls_token_top1", "token-routed (random)", 0.9),
                ("ls_compiled_mixed", "one adapter per request, compiled step,", 0.95),
                ("ls_compiled_token_top1", "token-routed (random), compiled step,", 0.9))


def _spread(r: dict, *runs: tuple[int, str]) -> float | None:
    """The widest decode spread among the (batch, configuration) runs a target compares: how far
    its ratio can be trusted (issue 17: every target reported with its spread)."""
    spreads = [_get(r, b, c, "decode_spread") for b, c in runs]
    return max((x for x in spreads if x is not None), default=None)


def _targets(model_result: dict, cfg: BenchConfig) -> list[dict]:
    r = model_result
    out = _single_stream_targets(r)
    big = max(cfg.batch_sizes)
    for b in cfg.batch_sizes:
        for config, label, goal in ROUTED_GOALS:
            ratio = _ratio(_get(r, b, config), _get(r, b, "merged"))
            if ratio is not None:
                out.append({"target": f"top-1 {label} decode >= {goal}x merged weights (batch {b})", "ratio": ratio,
                            "goal": goal, "met": ratio >= goal, "spread": _spread(r, (b, config), (b, "merged"))})
    vs_peft = _ratio(_get(r, big, "ls_mixed"), _get(r, big, "peft_mixed"))
    ceiling = _ratio(_get(r, big, "base"), _get(r, big, "peft_mixed"))
    if vs_peft is not None:
        entry = {"target": f"{big} requests over {cfg.n_mixed} adapters >= 3x PEFT adapter_names decode", "ratio": vs_peft,
                 "goal": 3.0, "met": vs_peft >= 3.0, "ceiling": ceiling,
                 "spread": _spread(r, (big, "ls_mixed"), (big, "peft_mixed"))}
        out.append(entry)
        if ceiling is not None and ceiling < 3.0:
            vs_base = _ratio(_get(r, big, "ls_mixed"), _get(r, big, "base"))
            out.append({"target": f"(ceiling {ceiling}x < 3x) {big} requests over {cfg.n_mixed} adapters >= 0.9x the base model",
                        "ratio": vs_base, "goal": 0.9, "met": vs_base is not None and vs_base >= 0.9,
                        "spread": _spread(r, (big, "ls_mixed"), (big, "base"))})
    sc = r.get("scaling", {})
    for n in sorted(int(k) for k in sc if int(k) >= 128) if "8" in sc else []:
        resident = sc[str(n)].get("resident")
        paged = f" ({resident} resident)" if resident is not None and resident < n else ""
        for b in cfg.batch_sizes:
            t8 = sc["8"].get(str(b), {}).get("decode_tok_s")
            cost = _ratio(t8, sc[str(n)].get(str(b), {}).get("decode_tok_s"))  # time per token at n / at 8
            if cost is not None:
                runs = [sc[k].get(str(b), {}).get("decode_spread") for k in ("8", str(n))]
                out.append({"target": f"decode cost with {n} adapters loaded{paged} <= 1.2x with 8 (batch {b})",
                            "ratio": cost, "goal": 1.2, "met": cost <= 1.2, "lower_is_better": True,
                            "spread": max((x for x in runs if x is not None), default=None)})
    compiled_mixed = _ratio(_get(r, big, "ls_compiled_mixed"), _get(r, big, "base"))
    if compiled_mixed is not None:
        out.append({"target": f"{big} requests over {cfg.n_mixed} adapters, compiled step, >= 0.9x the base model",
                    "ratio": compiled_mixed, "goal": 0.9, "met": compiled_mixed >= 0.9,
                    "spread": _spread(r, (big, "ls_compiled_mixed"), (big, "base"))})
    same_step = _ratio(_get(r, big, "ls_compiled_mixed"), _get(r, big, "ls_compiled_base"))
    if same_step is not None:  # the same comparison with the base on the compiled step too
        out.append({"target": f"{big} requests over {cfg.n_mixed} adapters vs no adapter, both on the compiled step, >= 0.9x",
                    "ratio": same_step, "goal": 0.9, "met": same_step >= 0.9,
                    "spread": _spread(r, (big, "ls_compiled_mixed"), (big, "ls_compiled_base"))})
    dense = _ratio(_get(r, big, "ls_dense"), _get(r, big, "peft_xlora"))
    if dense is not None:
        out.append({"target": f"dense mixing over {cfg.n_mixed} adapters >= 5x PEFT X-LoRA decode (batch {big})",
                    "ratio": dense, "goal": 5.0, "met": dense >= 5.0,
                    "spread": _spread(r, (big, "ls_dense"), (big, "peft_xlora"))})
    return out


def _single_stream_targets(r: dict) -> list[dict]:
    """Batch 1 with an adapter on the compiled step: >= 3x transformers' eager `generate` of the
    base model, and >= 50% of the matvec ceiling (`bench.limit`), both measured in this run."""
    out = []
    comp = _get(r, 1, "ls_compiled")
    vs_hf = _ratio(comp, _get(r, 1, "hf_generate"))
    # the matvec sweep bounds any decode step: where it is below 3x eager generate, 3x is out of
    # reach on this machine and the report says so (the 50%-of-limit target below still judges)
    ceiling = _ratio(r.get("limit", {}).get("tokens_per_s"), _get(r, 1, "hf_generate"))
    if vs_hf is not None:
        above = f"(ceiling {ceiling}x < 3x: the matvec limit itself) " if ceiling is not None and ceiling < 3.0 else ""
        out.append({"target": f"{above}batch-1 decode with an adapter (compiled step) >= 3x transformers' eager "
                              "generate of the base model", "ratio": vs_hf, "goal": 3.0, "met": vs_hf >= 3.0,
                    "ceiling": ceiling, "spread": _spread(r, (1, "ls_compiled"), (1, "hf_generate"))})
    frac = _ratio(comp, r.get("limit", {}).get("tokens_per_s"))
    if frac is not None:
        out.append({"target": "batch-1 decode with an adapter (compiled step) >= 50% of the matvec limit",
                    "ratio": frac, "goal": 0.5, "met": frac >= 0.5, "spread": _spread(r, (1, "ls_compiled"))})
    return out


def _limit_lines(m: dict) -> list[str]:
    """The single-stream section: the matvec ceiling per weight shape, and the compile cost."""
    lines = []
    lim = m.get("limit")
    if lim:
        lines += ["### The batch-1 limit (matvec sweep over the model's weights)", "",
                  f"Every weight once as a one-row matvec: {lim['weights_mb']} MB in {lim['sweep_ms']} ms "
                  f"(median, spread {100 * lim['spread']:.0f}%) = {lim['gb_s']} GB/s, a ceiling of "
                  f"**{lim['tokens_per_s']} tokens/s** for a decode step that did nothing else.", "",
                  "| weight shape | count | MB | GB/s |", "|---|---|---|---|"]
        lines += [f"| {s['shape'][0]}x{s['shape'][1]} | {s['count']} | {s['mb']} | {s['gb_s']} |" for s in lim["shapes"]]
        lines.append("")
    comp = m.get("compile")
    if comp:
        calls = ", ".join(f"{k}: {v} s" for k, v in comp["first_call_s"].items()) or "none"
        lines += [f"Compiled decode step ({comp['backend']}): first call per (batch x cache length x choices) {calls}"
                  + (f"; fell back to eager: `{comp['failed'][:160]}`" if comp.get("failed") else "") + ".", ""]
    return lines


def markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [f"# loraswitch benchmark ({res['device']})", "",
             f"{res['started']} on {res['platform']}, {res['torch_threads']} torch threads pinned to cores {res.get('cores')}, torch {res['torch']}, "
             f"{cfg['dtype']}. Prompts of {cfg['prompt_len']} random tokens, greedy decoding of {cfg['new_tokens']} new tokens "
             f"(X-LoRA: {cfg['xlora_new_tokens']}), median of {cfg['repeats']} runs per configuration, timed round-robin after one warm-up each (spread = (max - min) / median); random adapters of rank "
             f"{cfg['rank']} on q,k,v,o,gate,up,down; mixed batches spread over {cfg['n_mixed']} adapters. Tokens/s are "
             "batch totals. Ratios are within this one run.", ""]
    for m in res["models"]:
        if "error" in m:
            lines += [f"## {m['model']}: failed", "", f"`{m['error']}`", ""]
            continue
        s = m["shape"]
        lines += [f"## {m['model']} (hidden {s['hidden']}, {s['layers']} layers, {s['params_m']}M parameters; "
                  f"one adapter {m['adapter_mb']} MB)", ""]
        checks = m.get("sanity", [])
        if checks:
            lines += ["Sanity pair (same arithmetic, must be within +-5%, each spread <= 15%): " + ", ".join(
                f"base / merged = {c['base_vs_merged']}x at batch {c['batch']}"
                + (f", spread {100 * c['spread']:.0f}%" if c.get("spread") is not None else "")
                + f" ({'ok' if c['ok'] else 'TOO NOISY'})" for c in checks), ""]
        lines += ["### Targets", "", "| target | measured | spread | goal | status |", "|---|---|---|---|---|"]
        for t in m.get("targets", []):
            lines.append(f"| {t['target']} | {t['ratio']}x | {_pct(t.get('spread'))} | "
                         f"{'<=' if t.get('lower_is_better') else '>='} {t['goal']}x | {_status(t['met'])} |")
        lines.append("")
        lines += _limit_lines(m)
        for b, rows in m["batches"].items():
            lines += [f"### batch {b}", "", "| configuration | prefill tok/s | decode tok/s | spread | decode vs merged | "
                      "decode vs base | peak memory growth (MB) |", "|---|---|---|---|---|---|---|"]
            merged = rows.get("merged", {}).get("decode_tok_s")
            basev = rows.get("base", {}).get("decode_tok_s")
            for name, r in rows.items():
                if "error" in r:
                    lines.append(f"| `{name}` | error: {r['error'][:80]} | | | | | |")
                    continue
                pre = f"{r['prefill_tok_s']:.0f}" if r.get("prefill_tok_s") else "–"
                spread = f"{100 * r['decode_spread']:.0f}%" if r.get("decode_spread") is not None else "–"
                lines.append(f"| `{name}` | {pre} | {r['decode_tok_s']:.1f} | {spread} | {_fmt(_ratio(r['decode_tok_s'], merged))} | "
                             f"{_fmt(_ratio(r['decode_tok_s'], basev))} | {r['peak_mem_mb']:.0f} |")
            lines.append("")
        if m.get("scaling"):
            bs = [b for b in m["batches"]]
            lines += ["### Adapters loaded (requests spread over min(8, loaded) adapters)", "",
                      "| adapters loaded | resident | adapter stacks (MB) | "
                      + " | ".join(f"decode tok/s b={b} | cost vs 8 b={b}" for b in bs) + " |",
                      "|---|---|---|" + "---|---|" * len(bs)]
            ref = m["scaling"].get("8", {})
            for n, e in m["scaling"].items():
                cells = []
                for b in bs:
                    v = e.get(b, {}).get("decode_tok_s")
                    cells += [f"{v:.1f}" if v else "–", _fmt(_ratio(ref.get(b, {}).get("decode_tok_s"), v))]
                lines.append(f"| {n} | {e.get('resident', n)} | {e['adapter_stack_mb']} | " + " | ".join(cells) + " |")
            lines.append("")
        if m.get("profile"):
            lines += ["### Profile of loraswitch decode (torch profiler, largest batch)", ""]
            for name, p in m["profile"].items():
                lines.append(f"- `{name}`: {p['total_s']} s, {100 * p['add_lora_share']:.0f}% inside `add_lora`; top ops: " +
                             ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in p["top_ops"][:6]))
            lines.append("")
    lines += ["Configurations: see `loraswitch.bench` (module docstring). `merged` = one adapter folded into "
              "the weights (the limit for one adapter); `base` = no adapter (the ceiling for any batch). "
              "Peak memory growth: resident-set growth during a warm-up run (CPU) or CUDA peak allocation above "
              "the model's, i.e. activations, KV cache and kernel temporaries, not weights.", ""]
    return "\n".join(lines)


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _status(met: bool | None) -> str:
    return "met" if met else ("too noisy to judge" if met is None else "**NOT MET**")


def plot_scaling(res: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in res["models"] if m.get("scaling")]
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        ns = sorted(int(n) for n in m["scaling"])
        for b in m["batches"]:
            ys = [m["scaling"][str(n)].get(b, {}).get("decode_tok_s") for n in ns]
            ax.plot(ns, [y or 0 for y in ys], marker="o", label=f"loraswitch, batch {b}")
            for config, style in (("merged", ":"), ("peft_mixed", "--")):
                v = m["batches"][b].get(config, {}).get("decode_tok_s")
                if v:
                    ax.axhline(v, linestyle=style, linewidth=1, color=ax.lines[-1].get_color(),
                               label=f"{config}, batch {b}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("adapters loaded")
        ax.set_ylabel("decode tokens/s (batch total)")
        ax.set_title(m["model"])
        ax.legend(fontsize=7)
    fig.suptitle(f"decode throughput vs adapters loaded ({res['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True




def readme_summary(res: dict, details: str = "docs/benchmarks.md") -> str:
    """The README's short version: per model, the targets and the largest batch's decode rows."""
    lines = [f"{res['device']}, {res['torch_threads']} threads, {res['started']}; ratios within one run. "
             f"Every configuration, batch 1, memory and the scaling plot: [{details}]({details}).", ""]
    for m in res["models"]:
        if "error" in m:
            lines += [f"**{m['model']}**: failed (`{m['error'][:120]}`)", ""]
            continue
        big = str(max(int(b) for b in m["batches"]))
        rows = m["batches"][big]
        merged, basev = rows.get("merged", {}).get("decode_tok_s"), rows.get("base", {}).get("decode_tok_s")
        lines += [f"**{m['model']}** ({m['shape']['params_m']}M parameters), batch {big}:", "",
                  "| configuration | decode tok/s | vs merged | vs base |", "|---|---|---|---|"]
        for name, r in rows.items():
            if "error" not in r:
                lines.append(f"| `{name}` | {r['decode_tok_s']:.1f} | {_fmt(_ratio(r['decode_tok_s'], merged))} | "
                             f"{_fmt(_ratio(r['decode_tok_s'], basev))} |")
        lines += ["", "| target | measured | spread | goal | status |", "|---|---|---|---|---|"]
        for tg in m.get("targets", []):
            lines.append(f"| {tg['target']} | {tg['ratio']}x | {_pct(tg.get('spread'))} | "
                         f"{'<=' if tg.get('lower_is_better') else '>='} {tg['goal']}x | {_status(tg['met'])} |")
        lines.append("")
    return "\n".join(lines)
