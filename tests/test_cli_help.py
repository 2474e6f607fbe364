"""`loraswitch --help` must be instant: it imports no torch, transformers or peft."""

from __future__ import annotations

import subprocess
import sys
import time


def test_help_imports_no_heavy_modules():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom loraswitch.cli import app\n"
            "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output\n"
            "assert 'serve' in r.output and 'eval' in r.output and 'merge' in r.output, r.output\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'fastapi') if m in sys.modules)\n"
            "print(','.join(heavy))\n")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"--help imported {out.stdout.strip()}"
    assert elapsed < 5, f"--help took {elapsed:.1f} s"  # generous for a loaded CI machine; ~0.3 s here


def test_an_empty_prompt_is_a_one_line_error_before_any_model_loads():
    from typer.testing import CliRunner

    from loraswitch.cli import app

    for command in ("generate", "route"):
        r = CliRunner().invoke(app, [command, "   "])
        assert r.exit_code == 2 and "the prompt is empty" in r.output, r.output


def test_a_mistyped_folder_is_an_error_not_a_quiet_fallback(tmp_path):
    """--adapter-dir / --router-dir that do not exist (or name a file) used to answer with the base
    model or with Arrow after a warning, exit 0."""
    from typer.testing import CliRunner

    from loraswitch.cli import app

    (tmp_path / "file").write_text("x")
    for flag, path, why in (("--adapter-dir", tmp_path / "nope", "does not exist"),
                            ("--adapter-dir", tmp_path / "file", "is a file"),
                            ("--router-dir", tmp_path / "nope", "does not exist")):
        r = CliRunner().invoke(app, ["route", flag, str(path), "What is 2 + 3?"])
        assert r.exit_code == 2 and why in " ".join(r.output.split()), r.output  # rich wraps long lines


def test_an_adapter_folder_with_no_adapters_says_so(tmp_path):
    """A folder that holds no adapter (a mistyped library path) answers from the base model, and
    says so instead of silently (found by a review)."""
    from typer.testing import CliRunner

    from loraswitch.cli import app

    (tmp_path / "lib").mkdir()
    r = CliRunner().invoke(app, ["route", "--adapter-dir", str(tmp_path / "lib"), "What is 2 + 3?"])
    assert r.exit_code == 0 and "no adapters found in" in " ".join(r.output.split()), r.output


def test_max_threshold_is_for_the_sequence_router_only():
    from typer.testing import CliRunner

    from loraswitch.cli import app

    r = CliRunner().invoke(app, ["train-router", "--router", "gate", "--max-threshold", "0.8"])
    assert r.exit_code == 2 and "applies to --router seq" in r.output, r.output
    r = CliRunner().invoke(app, ["train-router", "--max-threshold", "1.5"])
    assert r.exit_code == 2, r.output  # out of [0.2, 0.99]


def test_training_a_router_for_your_own_adapters_needs_out(tmp_path):
    """Without --out the router went to the bundled library's own routers folder, inside the
    package, replacing the demo's (a black-box review)."""
    from typer.testing import CliRunner

    from loraswitch.cli import app

    r = CliRunner().invoke(app, ["train-router", "--adapter-dir", str(tmp_path), "--data", str(tmp_path)])
    assert r.exit_code != 0 and "--out FOLDER is required" in r.output, r.output
