"""Adapters on disk: reading PEFT LoRA adapter folders into validated in-memory weights.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`; its name is the
folder's name. Reading checks everything that could make an adapter silently wrong against the
base it will run on (module exists and is linear, shapes agree, weights are finite) and refuses
anything we do not apply exactly (DoRA, LoRA bias, embedding LoRA, fully trained modules, pickled
weights). Each refusal is an `AdapterError` naming the adapter and the reason; scanning a folder
collects refusals per adapter so one bad adapter never stops the others.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
RESERVED_NAMES = ("auto", "base")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
# base_model.model.<module>.lora_A[.<peft adapter name>].weight
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter was refused; `str()` says which one and exactly why."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name
        self.reason = reason


@dataclass
class LoraModule:
    """One targeted linear layer's low-rank update: delta W = scale * B @ A."""

    A: torch.Tensor  # [rank, in_features]
    B: torch.Tensor  # [out_features, rank]
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """The exact dense update `scale * B @ A` ([out, in]); merging and tests use it."""
        return self.scale * (self.B @ self.A)


@dataclass
class Adapter:
    """A validated LoRA adapter: weights keyed by the base model's module names."""

    name: str
    modules: dict[str, LoraModule]
    config: dict = field(default_factory=dict)
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @property
    def target_modules(self) -> list[str]:
        return sorted({key.rsplit(".", 1)[-1] for key in self.modules})

    @property
    def n_params(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())

    @property
    def fingerprint(self) -> str:
        """Identifies these exact weights: trained routers record it per adapter, so a library
        whose adapters were added, removed, reordered or retrained is detected, never misrouted."""
        if "_fingerprint" not in self.__dict__:
            h = hashlib.sha1()
            for key in sorted(self.modules):
                m = self.modules[key]
                h.update(key.encode())
                h.update(m.A.float().numpy().tobytes())
                h.update(m.B.float().numpy().tobytes())
                h.update(repr(m.scale).encode())
            self.__dict__["_fingerprint"] = h.hexdigest()[:16]
        return self.__dict__["_fingerprint"]

    @property
    def size_bytes(self) -> int:
        if self.path is not None and (self.path / WEIGHTS_FILE).is_file():
            return (self.path / WEIGHTS_FILE).stat().st_size
        return sum(m.A.nbytes + m.B.nbytes for m in self.modules.values())


def validate_name(name: str) -> None:
    if name in RESERVED_NAMES:
        raise AdapterError(name, f"the names {RESERVED_NAMES} are reserved (they mean routing / no adapter)")
    if not _NAME_RE.match(name):
        raise AdapterError(name, "names must be 1-128 characters of letters, digits, '_', '-', '.'")


def _read_config(name: str, path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterError(name, f"{path} is not a directory")
    if not cfg_path.is_file():
        raise AdapterError(name, f"missing {CONFIG_FILE} in {path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(name, f"corrupt {CONFIG_FILE}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(name, f"corrupt {CONFIG_FILE}: expected a JSON object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(name, f"peft_type {cfg.get('peft_type')!r} is not LoRA; only LoRA adapters are supported")
    if cfg.get("use_dora"):
        raise AdapterError(name, "DoRA adapters (use_dora=true) are not supported yet")
    if cfg.get("lora_bias"):
        raise AdapterError(name, "LoRA with a bias on B (lora_bias=true) is not supported")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise AdapterError(name, f"adapter_config.json has no valid rank r (got {cfg.get('r')!r})")
    return cfg


def _scale(cfg: dict, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA; per-module
    overrides from alpha_pattern apply (rank_pattern is already visible in the tensor shapes)."""
    alpha = cfg.get("lora_alpha", cfg["r"])
    patterns = cfg.get("alpha_pattern") or {}
    if patterns:
        key = get_pattern_key(list(patterns), module)
        alpha = patterns.get(key, alpha)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _read_tensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [p for p in PICKLE_FILES if (path / p).is_file()]
        if pickles:
            raise AdapterError(
                name,
                f"weights are in {pickles[0]}, a pickle (loading it can run arbitrary code); "
                "only safetensors are accepted: convert it with safetensors.torch.save_file",
            )
        raise AdapterError(name, f"missing {WEIGHTS_FILE} in {path}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:  # safetensors raises SafetensorError / OSError for broken files
        raise AdapterError(name, f"corrupt {WEIGHTS_FILE}: {exc}") from exc


def read_adapter(path: str | Path, base: nn.Module, name: str | None = None, base_name: str | None = None) -> Adapter:
    """Read and validate one PEFT LoRA adapter folder against `base` (raises AdapterError)."""
    path = Path(path)
    name = name or path.name
    validate_name(name)
    cfg = _read_config(name, path)
    tensors = _read_tensors(name, path)
    declared = cfg.get("base_model_name_or_path")
    wrong_base_hint = f" (the adapter was trained for {declared!r}: wrong base model?)" if declared else ""

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            if "lora_embedding" in key:
                raise AdapterError(name, "LoRA on embedding layers is not supported")
            raise AdapterError(
                name, f"tensor {key!r} is not a LoRA factor (fully trained modules / modules_to_save are not applied)"
            )
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    if not pairs:
        raise AdapterError(name, f"{WEIGHTS_FILE} holds no LoRA weights")

    modules: dict[str, LoraModule] = {}
    dtype = next(base.parameters()).dtype
    for module_name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(name, f"module {module_name!r} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        try:
            target = base.get_submodule(module_name)
        except AttributeError:
            raise AdapterError(name, f"targets module {module_name!r}, which the base model does not have{wrong_base_hint}") from None
        if not isinstance(target, nn.Linear) and isinstance(getattr(target, "base", None), nn.Linear):
            target = target.base  # already wrapped by a running engine (hot-loading)
        if not isinstance(target, nn.Linear):
            raise AdapterError(name, f"targets {module_name!r}, a {type(target).__name__}; only nn.Linear layers are supported")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(name, f"module {module_name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form a low-rank pair")
        if A.shape[1] != target.in_features or B.shape[0] != target.out_features:
            raise AdapterError(
                name,
                f"module {module_name!r}: update is {B.shape[0]}x{A.shape[1]} but the base layer is "
                f"{target.out_features}x{target.in_features}{wrong_base_hint}",
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(name, f"module {module_name!r} has NaN or Inf weights")
        modules[module_name] = LoraModule(A.to(dtype), B.to(dtype), _scale(cfg, module_name, A.shape[0]))

    adapter = Adapter(name=name, modules=modules, config=cfg, path=path)
    if declared and base_name and _family(declared) != _family(base_name):
        adapter.warnings.append(f"trained for {declared!r}, running on {base_name!r} (shapes match)")
    return adapter


def _family(model_name: str) -> str:
    """A loose identity for comparing base names: the last path part, lowercased, without
    quantization suffixes ('SmolLM2-135M-Instruct.Q4_1.gguf' ~ 'HuggingFaceTB/SmolLM2-135M-Instruct')."""
    stem = Path(str(model_name)).name.lower()
    return re.split(r"[.](?:q\d|f16|f32|bf16|gguf)", stem)[0]


def find_adapter_dirs(root: str | Path) -> list[Path]:
    """Adapter folders directly inside `root` (any subfolder with an adapter config or weights),
    or `root` itself when it is one."""
    root = Path(root)
    if (root / CONFIG_FILE).is_file():
        return [root]
    if not root.is_dir():
        return []
    markers = (CONFIG_FILE, WEIGHTS_FILE, *PICKLE_FILES)
    return sorted(p for p in root.iterdir() if p.is_dir() and any((p / m).exists() for m in markers))


@dataclass
class ScanResult:
    adapters: list[Adapter]
    errors: dict[str, AdapterError]  # adapter name -> why it was refused


def scan(roots: list[str | Path], base: nn.Module, base_name: str | None = None, taken: set[str] | None = None) -> ScanResult:
    """Read every adapter folder under `roots`; refusals are collected, never raised."""
    seen: dict[str, Path] = {}
    taken = set(taken or ())
    adapters: list[Adapter] = []
    errors: dict[str, AdapterError] = {}
    for root in roots:
        if not Path(root).is_dir():
            errors[str(root)] = AdapterError(str(root), f"adapter folder {str(root)!r} does not exist")
            continue
        for path in find_adapter_dirs(root):
            name = path.name
            try:
                if name in seen or name in taken:
                    where = seen.get(name, "the running engine")
                    raise AdapterError(name, f"duplicate name: already loaded from {where}")
                adapters.append(read_adapter(path, base, name=name, base_name=base_name))
                seen[name] = path
            except AdapterError as exc:
                errors[f"{name} ({path})" if name in errors else name] = exc
    return ScanResult(adapters, errors)


# ---------------------------------------------------------------- example prompts

EXAMPLE_FILES = ("examples.jsonl", "examples.txt")


def read_examples(path: str | Path) -> list[tuple[str, str | None]]:
    """(prompt, answer or None) pairs from an example file: `.jsonl` (one object per line with a
    "prompt" and an optional "answer") or `.txt` (one prompt per line). Router training folders,
    an adapter's own `examples.*` and AdaMerging's unlabeled prompts all use this one format."""
    path = Path(path)
    rows: list[tuple[str, str | None]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            rows.append((line.strip(), None))
            continue
        try:
            obj = json.loads(line)
            prompt, answer = obj["prompt"], obj.get("answer")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field ({exc})") from exc
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{lineno}: 'prompt' must be a non-empty string")
        rows.append((prompt, None if answer is None else str(answer)))
    return rows


def adapter_examples(adapter: Adapter) -> list[tuple[str, str | None]]:
    """The example prompts shipped inside an adapter's folder (`examples.jsonl` / `.txt`), if any."""
    if adapter.path is None:
        return []
    for name in EXAMPLE_FILES:
        if (adapter.path / name).is_file():
            return read_examples(adapter.path / name)
    return []
