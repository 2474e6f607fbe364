"""`loraswitch zoo build`: train a library's adapters (`demo` or `bigbench`) and write them, with
a manifest, where the package finds them (`loraswitch/libraries/<library>/adapters/`).

Recipes differ per task on purpose: the easy classification task gets a rank-4 adapter on the
attention projections only, addition and sorting (the hardest two) get rank 16 everywhere. That keeps the committed library
small and exercises mixed ranks and target modules in every demo run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loraswitch.base import Base
from loraswitch.constants import DEMO_ADAPTER_DIR
from loraswitch.demo.zoo.recipes import training_pairs, zoo_recipes
from loraswitch.demo.zoo.train import Recipe, train_adapter

MANIFEST = "manifest.json"


def shrink_to_bf16(adapter_dir: Path) -> None:
    """Store the weights in bfloat16: half the size in git; loaders upcast to the base dtype.
    The manifest's accuracies are measured on these stored weights, not the fp32 originals."""
    path = adapter_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def stamp_base(adapter_dir: Path, base_name: str) -> None:
    """Name the base model in the adapter's config (and PEFT's model card) as the library knows it
    (`HuggingFaceTB/SmolLM2-135M-Instruct`), not the cache folder or machine path PEFT records."""
    for file in ("adapter_config.json", "README.md"):
        path = adapter_dir / file
        if not path.is_file():
            continue
        if file.endswith(".json"):
            cfg = json.loads(path.read_text())
            old, cfg["base_model_name_or_path"] = cfg.get("base_model_name_or_path"), base_name
            path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        elif old:
            path.write_text(path.read_text().replace(old, base_name))


def read_manifest(out_dir: Path = DEMO_ADAPTER_DIR) -> dict:
    path = out_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"adapters": {}}


def write_manifest(manifest: dict, out_dir: Path = DEMO_ADAPTER_DIR) -> None:
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def train_zoo(base: Base, tasks: list[str], out_dir: Path = DEMO_ADAPTER_DIR, steps_scale: float = 1.0,
              library: str = "demo") -> dict:
    """Train each task's adapter into `out_dir/<task>/` and record its recipe in the manifest."""
    manifest = read_manifest(out_dir)
    recipes = zoo_recipes(library)
    for task in tasks:
        recipe = recipes[task]
        if steps_scale != 1.0:
            recipe = Recipe(**{**recipe.to_dict(), "steps": max(1, round(recipe.steps * steps_scale))})
        pairs = training_pairs(library, task, recipe)
        val = training_pairs(library, task, recipe, "val") if recipe.checks else None
        stats = train_adapter(base, pairs, recipe, out_dir / task, name=task, val_pairs=val)
        shrink_to_bf16(out_dir / task)
        stamp_base(out_dir / task, base.name)
        manifest = {**read_manifest(out_dir), "base": base.name}  # re-read: a `zoo eval` may have written meanwhile
        entry = manifest["adapters"].setdefault(task, {})
        entry.update({"task": task, "recipe": recipe.to_dict(), "training": stats, "trained_at": time.strftime("%Y-%m-%d")})
        entry.pop("eval", None)  # stale until `zoo eval` measures the new weights
        write_manifest(manifest, out_dir)
    return manifest
