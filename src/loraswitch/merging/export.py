"""Writing a merge: a PEFT LoRA adapter (truncated SVD of each merged update) or a full model.

An adapter keeps the result small and routable (load it next to the others), but a merged
update is in general not low-rank: TIES/DARE/PCB act entrywise and make it full-rank, and even
task arithmetic sums ranks. So the export factors each dW by truncated SVD at the chosen rank,
`B = U_r S_r`, `A = Vh_r`, with lora_alpha = r (scale 1), and reports how much was lost,
||dW - B A||_F / ||dW||_F per module and overall, in `merge_report.json`. Choosing a rank is a
size/fidelity trade-off the report makes visible; `rank: full` picks the smallest exact rank.
A full model export (`format: model`) adds dW to the base weights and loses nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from loraswitch.base import Base
from loraswitch.layers import MultiLoRALinear
from loraswitch.library import WEIGHTS_FILE
from loraswitch.merging.merge import MergeResult

REPORT_FILE = "merge_report.json"


def svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-`rank` factorisation of `delta` [out, in] (Eckart-Young): A = Vh_r [r, in],
    B = U_r S_r [out, r]. Ranks above min(out, in) are zero-padded, which is exact."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, S.numel())
    A = torch.zeros(rank, delta.shape[1])
    B = torch.zeros(delta.shape[0], rank)
    A[:k] = Vh[:k]
    B[:, :k] = U[:, :k] * S[:k]
    return A, B


def relative_error(delta: Tensor, A: Tensor, B: Tensor) -> float:
    """||dW - B A||_F / ||dW||_F (0 for an all-zero update, which any factorisation represents)."""
    norm = float(torch.linalg.norm(delta.float()))
    if norm == 0:
        return 0.0
    return float(torch.linalg.norm(delta.float() - B.float() @ A.float())) / norm


def target_modules(modules: list[str], model: nn.Module) -> list[str]:
    """PEFT `target_modules` for exactly `modules`: the module suffixes (q_proj, ...) when they
    cover every base linear with those suffixes (the usual case), else the full module names,
    so PEFT never creates LoRA layers the merge has no weights for."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    matching = {n for n, mod in model.named_modules() if isinstance(mod, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if matching == set(modules) else sorted(modules)


def resolve_rank(rank: int | str, result: MergeResult) -> int:
    """`rank: full` -> the largest per-module exact rank (summed input ranks for linear and
    AdaMerging, the full dimension for entrywise methods)."""
    if rank == "full":
        return max(result.exact_rank.values())
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer or 'full', got {rank!r}")
    return rank


def _base_report(result: MergeResult, base: Base, out_dir: Path, fmt: str) -> dict[str, Any]:
    report: dict[str, Any] = {
        "method": result.method,
        "base": base.name,
        "adapters": [
            {"name": a.name, "weight": w, "fingerprint": a.fingerprint, "path": str(a.path) if a.path else None}
            for a, w in zip(result.adapters, result.weights, strict=True)
        ],
        "parameters": result.parameters,
        "output": {"format": fmt, "path": str(out_dir)},
        "n_modules": len(result.deltas),
    }
    if result.adamerging is not None:
        report["adamerging"] = result.adamerging
    return report


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    path = Path(out_dir) / REPORT_FILE
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def export_adapter(result: MergeResult, out_dir: str | Path, rank: int | str, base: Base, progress: bool = True) -> dict[str, Any]:
    """Write the merge as a PEFT LoRA adapter folder plus `merge_report.json`; returns the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r = resolve_rank(rank, result)
    dtype = next(base.model.parameters()).dtype
    tensors: dict[str, Tensor] = {}
    modules: dict[str, dict[str, float | int]] = {}
    err2 = norm2 = 0.0
    for key in tqdm(result.modules, desc=f"svd (rank {r})", unit="module", disable=not progress):
        delta = result.deltas[key].float()
        A, B = svd_factors(delta, r)
        A, B = A.to(dtype).contiguous(), B.to(dtype).contiguous()  # report the error of what is saved
        tensors[f"base_model.model.{key}.lora_A.weight"] = A
        tensors[f"base_model.model.{key}.lora_B.weight"] = B
        norm = float(torch.linalg.norm(delta))
        rel = relative_error(delta, A, B)
        err2 += (rel * norm) ** 2
        norm2 += norm**2
        modules[key] = {"relative_error": rel, "norm": norm, "exact_rank": result.exact_rank.get(key, min(delta.shape))}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    LoraConfig(
        r=r, lora_alpha=r, target_modules=target_modules(result.modules, base.model), lora_dropout=0.0,
        bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base.name, inference_mode=True,
    ).save_pretrained(str(out_dir))
    report = _base_report(result, base, out_dir, "adapter")
    report["output"]["rank"] = r
    errors = [m["relative_error"] for m in modules.values()]
    report["reconstruction"] = {
        "overall_relative_error": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0,
        "max_relative_error": max(errors, default=0.0),
        "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
        "modules": modules,
    }
    write_report(out_dir, report)
    return report


def export_model(result: MergeResult, out_dir: str | Path, base: Base) -> dict[str, Any]:
    """Write base weights + dW as a full model (safetensors) with its tokenizer; the in-memory
    base model is restored afterwards, so it can keep serving unmerged."""
    model = base.model
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        # an engine's wrappers would be saved as `<module>.base.weight`, which no loader expects
        raise ValueError("export_model needs a base model no engine has wrapped (load a fresh Base)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for key, delta in result.deltas.items():
                weight = model.get_submodule(key).weight
                saved[key] = weight.detach().clone()
                weight.add_(delta.to(weight.dtype))
        model.save_pretrained(str(out_dir), safe_serialization=True)
        base.tokenizer.save_pretrained(str(out_dir))
    finally:
        with torch.no_grad():
            for key, original in saved.items():
                model.get_submodule(key).weight.copy_(original)
    report = _base_report(result, base, out_dir, "model")
    report["modules"] = {key: {"norm": float(torch.linalg.norm(d.float()))} for key, d in result.deltas.items()}
    write_report(out_dir, report)
    return report
