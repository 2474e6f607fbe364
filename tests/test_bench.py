"""The speed benchmark (`loraswitch bench`, package `loraswitch.bench`) end to end on a tiny model."""

from __future__ import annotations


def test_bench_smoke(tmp_path, tokenizer, monkeypatch):
    """The benchmark runs end to end on a tiny random Llama and writes JSON, markdown and plot."""
    import loraswitch.bench as bench
    import loraswitch.bench.fixtures as fixtures

    monkeypatch.setattr(fixtures, "_TOKENIZER", tokenizer)
    cfg = bench.BenchConfig(models=["llama-tiny"], batch_sizes=[1, 2], new_tokens=3, prompt_len=4, repeats=2,
                            scaling=[1, 8, 10], xlora_new_tokens=2, out_dir=tmp_path, compile_backend="eager",
                            configs=["base", "merged", "hf_generate", "ls_compiled", "ls_compiled_mixed", "ls_mixed", "ls_dense", "ls_token_top2",
                                     "peft_mixed", "peft_xlora"],
                            batch1_configs=["base", "merged", "hf_generate", "ls_compiled"])
    res = bench.run_bench(cfg)
    m = res["models"][0]
    assert "error" not in m, m.get("error")
    rows = m["batches"]["2"]
    assert set(rows) == {"base", "merged", "ls_compiled", "ls_compiled_mixed", "ls_mixed", "ls_dense", "ls_token_top2", "peft_mixed", "peft_xlora"}
    assert set(m["batches"]["1"]) == {"base", "merged", "hf_generate", "ls_compiled"}  # the single-stream table
    assert m["compile"]["failed"] is None and set(m["compile"]["first_call_s"]) == {"1x64x1", "2x64x1"}
    assert m["limit"]["tokens_per_s"] > 0 and {tuple(s["shape"]) for s in m["limit"]["shapes"]} >= {(64, 64), (49152, 64)}
    assert all("error" not in r and r["decode_tok_s"] > 0 for r in rows.values()), rows
    assert set(m["scaling"]) == {"1", "8", "10"}
    assert m["scaling"]["10"]["adapter_stack_mb"] > m["scaling"]["8"]["adapter_stack_mb"]
    names = [t["target"] for t in m["targets"]]
    assert any("3x PEFT" in n for n in names) and any("128" in n for n in names) is False
    assert any("X-LoRA" in n for n in names) and any("compiled step, >= 0.9x the base" in n for n in names)
    assert any("3x transformers' eager generate" in n for n in names) and any("matvec limit" in n for n in names)
    for f in ["bench_cpu.json", "bench_cpu.md", "bench_cpu_scaling.png"]:
        assert (tmp_path / f).is_file()
    md = (tmp_path / "bench_cpu.md").read_text()
    noisy = not all(c["ok"] for c in m["sanity"])
    assert [c["batch"] for c in m["sanity"]] == [1, 2]
    assert "The batch-1 limit" in md and "Compiled decode step (eager)" in md
    for t in m["targets"]:  # each verdict follows from its ratio (or the run says it is too noisy)
        if noisy:
            assert t["met"] is None, t
        elif t["ratio"] is not None:
            hit = t["ratio"] <= t["goal"] if t.get("lower_is_better") else t["ratio"] >= t["goal"]
            assert t["met"] == hit, t
        assert f"| {t['target']} | {t['ratio']}x |" in md
        row = next(line for line in md.splitlines() if line.startswith(f"| {t['target']} |"))
        assert row.rstrip().endswith("| met |") == bool(t["met"]), row
        assert row.rstrip().endswith("| too noisy to judge |") == (t["met"] is None), row
    assert ("TOO NOISY" in md) == noisy
    for r in rows.values():  # medians of the round-robin runs, with their spread
        if r.get("new_tokens") is None:  # X-LoRA runs once
            assert len(r["runs_decode_tok_s"]) == 2
            assert sorted(r["runs_decode_tok_s"])[0] <= r["decode_tok_s"] <= sorted(r["runs_decode_tok_s"])[-1]


def test_interleaved_runs_round_robin_and_reports_medians():
    """Configurations are timed in rotating rounds after one warm-up each; a failing one gets an
    error and the others still report medians of their runs."""
    import torch

    from loraswitch.bench.measure import Runner, Timing, interleaved

    calls: list[str] = []
    speeds = {"a": iter([1.0, 4.0, 2.0, 3.0]), "b": iter([5.0, 5.0, 6.0, 7.0])}

    def make(name):
        def run():
            calls.append(name)
            return Timing(0.1, 1.0 / next(speeds[name]), 10, 1)
        return run

    def broken():
        calls.append("c")
        raise RuntimeError("boom")

    out = interleaved({"a": Runner(make("a")), "b": Runner(make("b")), "c": Runner(broken)}, 3, torch.device("cpu"))
    assert calls == ["a", "b", "c", "a", "b", "b", "a", "a", "b"]  # warm-ups, then rounds rotated by one
    assert out["c"] == {"error": "RuntimeError: boom"}
    assert out["a"]["runs_decode_tok_s"] == [4.0, 2.0, 3.0] and out["a"]["decode_tok_s"] == 3.0
    assert out["b"]["decode_tok_s"] == 6.0 and out["b"]["decode_spread"] == round(2 / 6, 3)


def test_a_batch_1_goal_above_the_machines_matvec_limit_is_reported_as_such():
    from loraswitch.bench.report import _single_stream_targets

    def run(limit: float) -> dict:
        return {"limit": {"tokens_per_s": limit},
                "batches": {"1": {"ls_compiled": {"decode_tok_s": 25.0}, "hf_generate": {"decode_tok_s": 20.0}}}}

    slow, fast = _single_stream_targets(run(35.0)), _single_stream_targets(run(80.0))
    assert slow[0]["target"].startswith("(ceiling 1.75x < 3x") and slow[0]["met"] is False
    assert not fast[0]["target"].startswith("(ceiling") and fast[0]["ceiling"] == 4.0
    assert [t["met"] for t in slow[1:]] == [True] and [t["met"] for t in fast[1:]] == [False]  # 25/35 vs 25/80 of the limit


def test_sanity_pair_needs_close_medians_and_still_runs():
    """base and merged within 5% only judges a run when neither moved by more than 15% between
    its own runs: two medians of widely spread runs can agree by chance."""
    from loraswitch.bench.config import BenchConfig
    from loraswitch.bench.report import sanity

    def result(spread):
        row = {"decode_tok_s": 100.0, "decode_spread": spread}
        return {"batches": {"16": {"base": dict(row), "merged": {**row, "decode_tok_s": 101.0}}}}

    cfg = BenchConfig(batch_sizes=[16])
    assert sanity(result(0.08), cfg)[0]["ok"]
    noisy = sanity(result(0.5), cfg)[0]
    assert not noisy["ok"] and noisy["spread"] == 0.5


def test_scaling_targets_name_every_large_library_and_its_resident_limit():
    """Every scaling point of 128 adapters or more is judged against 8; a paged library says how
    many of its adapters were resident."""
    from loraswitch.bench.config import BenchConfig
    from loraswitch.bench.report import _targets

    sc = {"8": {"resident": 8, "16": {"decode_tok_s": 100.0}}, "128": {"resident": 128, "16": {"decode_tok_s": 95.0}},
          "1000": {"resident": 128, "16": {"decode_tok_s": 70.0}}}
    got = {t["target"]: t for t in _targets({"batches": {}, "scaling": sc}, BenchConfig(batch_sizes=[16]))}
    assert got["decode cost with 128 adapters loaded <= 1.2x with 8 (batch 16)"]["met"]
    paged = got["decode cost with 1000 adapters loaded (128 resident) <= 1.2x with 8 (batch 16)"]
    assert paged["ratio"] == round(100 / 70, 3) and paged["met"] is False


def test_rejudge_recomputes_targets_with_their_spreads_from_a_saved_run():
    """`bench --rejudge`: a saved run judged again by the current report code, nothing re-timed;
    each target carries the widest spread of the runs it compares."""
    from loraswitch.bench.config import BenchConfig
    from loraswitch.bench.run import rejudge

    rows = {"base": {"decode_tok_s": 100.0, "decode_spread": 0.05}, "merged": {"decode_tok_s": 100.0, "decode_spread": 0.04},
            "ls_mixed": {"decode_tok_s": 96.0, "decode_spread": 0.12}}
    res = {"config": {**BenchConfig(batch_sizes=[16]).__dict__, "out_dir": "x", "unknown_old_field": 1},
           "models": [{"model": "m", "batches": {"16": rows}, "targets": []}]}
    m = rejudge(res)["models"][0]
    mixed = next(t for t in m["targets"] if "one adapter per request decode" in t["target"])
    assert mixed["ratio"] == 0.96 and mixed["met"] is True and mixed["spread"] == 0.12
    assert m["sanity"][0]["ok"]
