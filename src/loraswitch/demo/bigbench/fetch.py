"""Getting BIG-bench's task files: from the PyPI sdist `bigbench==1.0.0`, once, into the cache.

The task files carry BIG-bench's canary and must never be committed, so the repository holds only
their names and what to expect of them (example counts, and the sdist's sha256); the text lives
in `cache_dir()/bigbench/` (`~/.cache/loraswitch/bigbench`, or under `LORASWITCH_CACHE`). Only the
files the ten tasks need are extracted from the 360 MB archive, and each is checked (parses,
has the expected number of examples) before anything trains or scores on it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from loraswitch.base import cache_dir

PACKAGE = "bigbench==1.0.0"
SDIST_NAME = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
VERIFIED = "verified.json"

# task file (relative to benchmark_tasks/) -> number of examples in bigbench 1.0.0
FILES: dict[str, int] = {
    "logical_deduction/three_objects/task.json": 300,
    "logical_deduction/five_objects/task.json": 500,
    "logical_deduction/seven_objects/task.json": 700,
    "question_selection/task.json": 1590,
    "abstract_narrative_understanding/4_distractors/task.json": 1000,
    "goal_step_wikihow/step_inference/task.json": 2250,
    "winowhy/task.json": 2865,
    "strategyqa/task.json": 2290,
    "disfl_qa/task.json": 8000,
    "linguistics_puzzles/task.json": 2000,
    "object_counting/task.json": 1000,
    "epistemic_reasoning/task.json": 2000,
}

# Ten more BIG-bench tasks no adapter, router or setting here was trained or tuned on: held-out
# single-task prompts for the segmentation benchmark (a prompt about one task must not be split)
HELDOUT_FILES: dict[str, int] = {
    "causal_judgment/task.json": 190,
    "date_understanding/task.json": 369,
    "disambiguation_qa/task.json": 258,
    "navigate/task.json": 1000,
    "penguins_in_a_table/task.json": 149,
    "ruin_names/task.json": 448,
    "snarks/task.json": 181,
    "sports_understanding/task.json": 1000,
    "temporal_sequences/task.json": 1000,
    "word_sorting/task.json": 1900,
}


class BigBenchDataError(RuntimeError):
    """The BIG-bench task files are missing, unfetchable or not what we expect; the message says
    what to run."""


def data_dir() -> Path:
    return cache_dir() / "bigbench"


def heldout_dir() -> Path:
    return data_dir() / "heldout"


def _check_file(path: Path, expected: int) -> str | None:
    """Why `path` is not a usable task file with `expected` examples, or None if it is."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{path}: unreadable ({exc})"
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        return f"{path}: no examples"
    if any(not isinstance(e, dict) or "input" not in e or ("target" not in e and "target_scores" not in e) for e in examples):
        return f"{path}: an example lacks input or target"
    if len(examples) != expected:
        return f"{path}: {len(examples)} examples, expected {expected}"
    return None


def verify(root: Path | None = None, files: dict[str, int] | None = None) -> list[str]:
    """Problems with the extracted files under `root` (empty: all present and as expected)."""
    root, files = root or data_dir(), FILES if files is None else files
    return [p for rel, n in files.items() if (p := _check_file(root / rel, n)) is not None]


def extract(sdist: Path, root: Path | None = None, files: dict[str, int] | None = None) -> list[Path]:
    """Copy just `files` out of the sdist into `root`, then verify them; returns their paths."""
    root, files = root or data_dir(), FILES if files is None else files
    wanted = {TASKS_PREFIX + rel: rel for rel in files}
    found: list[Path] = []
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                rel = wanted.get(member.name)
                if rel is None or not member.isfile():
                    continue
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".tmp")
                tmp.write_bytes(tar.extractfile(member).read())
                tmp.replace(target)
                found.append(target)
    except (OSError, tarfile.TarError) as exc:
        raise BigBenchDataError(f"cannot read {sdist}: {exc}") from None
    missing = sorted(set(files) - {str(p.relative_to(root)) for p in found})
    if missing:
        raise BigBenchDataError(f"{sdist} lacks {', '.join(missing)}")
    problems = verify(root, files)
    if problems:
        raise BigBenchDataError("extracted files failed verification: " + "; ".join(problems))
    (root / VERIFIED).write_text(json.dumps({"package": PACKAGE, "files": files}, indent=1) + "\n")
    return found


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(dest: Path) -> Path:
    """`pip download --no-deps bigbench==1.0.0` into `dest`; checks the sdist's sha256."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / SDIST_NAME
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BigBenchDataError(f"could not download {PACKAGE} with pip ({' / '.join(tail)}); "
                                f"with no network, pass an already downloaded {SDIST_NAME} with --sdist")
    if sha256(path) != SDIST_SHA256:
        raise BigBenchDataError(f"{path} does not have the sha256 of PyPI's {SDIST_NAME}")
    return path


def ensure(sdist: Path | None = None, root: Path | None = None, files: dict[str, int] | None = None) -> Path:
    """The verified data folder: already there, or extracted from `sdist`, or downloaded first
    (`files`: FILES, or HELDOUT_FILES into `heldout_dir()`)."""
    root = root or data_dir()
    if (root / VERIFIED).is_file() and not verify(root, files):
        return root
    if sdist is not None:
        extract(sdist, root, files)
        return root
    with tempfile.TemporaryDirectory(prefix="bigbench-") as tmp:
        extract(download(Path(tmp)), root, files)
    return root


def require(root: Path | None = None) -> Path:
    """The verified data folder, or a BigBenchDataError saying how to get it (never downloads:
    commands that only read data should not start a 360 MB download as a side effect)."""
    root = root or data_dir()
    problems = verify(root)
    if problems:
        raise BigBenchDataError(f"BIG-bench task files missing or invalid under {root} ({problems[0]}"
                                f"{'' if len(problems) == 1 else f' and {len(problems) - 1} more'}); "
                                "run `loraswitch data bigbench` first")
    return root


def load_task_file(rel: str, root: Path | None = None) -> dict:
    return json.loads(((root or data_dir()) / rel).read_text(encoding="utf-8"))
