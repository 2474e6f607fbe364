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
