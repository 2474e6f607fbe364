"""A served library on a random-weight base, for measuring the served path where the embedded
model is not installed (a lent GPU: the GGUF is 98 MB, over what a device call carries).

Writes into OUT:
* `base/`: a SmolLM2-shaped Llama (`--model`, `--layers` to cut it) with random weights, saved
  as a model directory with the embedded tokenizer (or $LORASWITCH_TOKENIZER's);
* `adapters/<task>/`: one random rank-8 PEFT adapter per demo task, named after it, so the demo's
  prompts (`load_server.build_requests`) name "their" adapter;
* `data/<task>.jsonl`: 200 training prompts of each demo task, in its training wordings;
* `routers/`: a sequence router trained on that base by `loraswitch train-router --data` (those
  prompts and the bundled `__none__` set, as a user would), so `auto` pays what it pays on the
  real model: the selector's feature pass, segmentation's screen, its decisions.

The weights are random, so answers are noise: measure speed with `ignore_eos` (every answer runs
to max_tokens), never quality. The router's decisions are real decisions on this base's
features; how many prompts it splits or abstains on is printed and goes into the report.

    python benchmarks/random_library.py OUT [--model smollm2-shape] [--layers 30]
    python benchmarks/auto_cost.py --base OUT/base --adapter-dir OUT/adapters --router-dir OUT/routers \
        --ignore-eos --max-tokens 32 --fresh-prompts
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from loraswitch.bench.config import LLAMA_SHAPES
from loraswitch.bench.fixtures import make_base, random_adapters
from loraswitch.demo.router_data import demo_pairs
from loraswitch.demo.tasks import TASK_NAMES
from loraswitch.eval.peft_baselines import harmonise
from loraswitch.library import Adapter
from loraswitch.routing.base import NONE_CLASS


def write_library(out: Path, model: str, layers: int, seed: int = 0) -> dict:
    """base/ and adapters/ under `out`; the base on the CPU (where it is saved from)."""
    if layers:
        hidden, _, inter, heads, kv = LLAMA_SHAPES[model]
        model = f"{model}-{layers}layers"
        LLAMA_SHAPES[model] = (hidden, layers, inter, heads, kv)
    base = make_base(model, torch.device("cpu"), torch.float32, seed)
    base.model.save_pretrained(out / "base", safe_serialization=True)
    base.tokenizer.save_pretrained(out / "base")
    adapters = [Adapter(task, a.modules) for task, a in
                zip(TASK_NAMES, random_adapters(base.model, len(TASK_NAMES), 8, seed), strict=True)]
    harmonise(adapters, out / "adapters", base.model, str(out / "base"))
    mc = base.model.config
    return {"model": model, "layers": mc.num_hidden_layers, "hidden": mc.hidden_size,
            "params_m": round(sum(p.numel() for p in base.model.parameters()) / 1e6, 1), "adapters": list(TASK_NAMES)}


def write_data(out: Path, per_task: int = 200, seed: int = 0) -> None:
    """data/<task>.jsonl: the demo's training prompts, the folder a user hands `train-router`."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    for task, pairs in demo_pairs("train", per_task, seed).items():
        if task != NONE_CLASS:  # train-router adds the bundled __none__ prompts itself
            rows = [json.dumps({"prompt": p, "answer": a}) for p, a in pairs]
            (out / "data" / f"{task}.jsonl").write_text("\n".join(rows) + "\n")


def train_router(out: Path) -> tuple[float, str]:
    """`loraswitch train-router` on the random base, on $LORASWITCH_DEVICE; where that fails (a
    GPU loan is one call: the rest of the run should not die with it), again on the CPU. Seconds
    taken and the device it trained on."""
    write_data(out)
    cmd = [sys.executable, "-m", "loraswitch.cli", "train-router", "--base", str(out / "base"),
           "--adapter-dir", str(out / "adapters"), "--data", str(out / "data"), "--out", str(out / "routers")]
    device = os.environ.get("LORASWITCH_DEVICE") or "cpu"
    t0 = time.perf_counter()
    if subprocess.run(cmd, env=dict(os.environ)).returncode != 0:
        if device == "cpu":
            raise SystemExit("train-router failed")
        print(f"train-router failed on {device} (above); training on the CPU instead", flush=True)
        device = "cpu"
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=dict(os.environ, LORASWITCH_DEVICE="cpu"))
    return time.perf_counter() - t0, device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--model", default="smollm2-shape", choices=sorted(LLAMA_SHAPES))
    p.add_argument("--layers", type=int, default=0, help="cut the model to this many layers (0: all of its own)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    info = write_library(args.out, args.model, args.layers, args.seed)
    print(f"wrote {args.out}/base ({info['model']}, {info['params_m']}M parameters) and "
          f"{len(info['adapters'])} adapters in {time.perf_counter() - t0:.0f} s", flush=True)
    seconds, device = train_router(args.out)
    print(f"trained the router on {device} in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
