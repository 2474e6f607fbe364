"""The speed benchmark (`loraswitch bench`, package `loraswitch.bench`) end to end on a tiny model."""

from __future__ import annotations


def test_bench_smoke(tmp_path, tokenizer, monkeypatch):
    """The benchmark runs end to end on a tiny random Llama and writes JSON, markdown and plot."""
    import loraswitch.bench as bench
    import loraswitch.bench.fixtures as fixtures

    monkeypatch.setattr(fixtures, "_TOKENIZER", tokenizer)
    cfg = bench.BenchConfig(models=["llama-tiny"], batch_sizes=[2], new_tokens=3, prompt_len=4, repeats=1,
                            scaling=[1, 8, 10], xlora_new_tokens=2, out_dir=tmp_path,
                            configs=["base", "merged", "ls_mixed", "ls_dense", "ls_token_top2", "peft_mixed", "peft_xlora"])
    res = bench.run_bench(cfg)
    m = res["models"][0]
    assert "error" not in m, m.get("error")
    rows = m["batches"]["2"]
    assert set(rows) == {"base", "merged", "ls_mixed", "ls_dense", "ls_token_top2", "peft_mixed", "peft_xlora"}
    assert all("error" not in r and r["decode_tok_s"] > 0 for r in rows.values()), rows
    assert set(m["scaling"]) == {"1", "8", "10"}
    assert m["scaling"]["10"]["adapter_stack_mb"] > m["scaling"]["8"]["adapter_stack_mb"]
    names = [t["target"] for t in m["targets"]]
    assert any("3x PEFT" in n for n in names) and any("128" in n for n in names) is False
    assert any("X-LoRA" in n for n in names)
    for f in ["bench_cpu.json", "bench_cpu.md", "bench_cpu_scaling.png"]:
        assert (tmp_path / f).is_file()
    md = (tmp_path / "bench_cpu.md").read_text()
    for t in m["targets"]:  # each verdict follows from its ratio, and the report prints that verdict
        if t["ratio"] is not None:
            hit = t["ratio"] <= t["goal"] if t.get("lower_is_better") else t["ratio"] >= t["goal"]
            assert t["met"] == hit, t
        assert f"| {t['target']} | {t['ratio']}x |" in md
        row = next(line for line in md.splitlines() if line.startswith(f"| {t['target']} |"))
        assert row.rstrip().endswith("| met |") == bool(t["met"]), row
