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
from safetensors import safe_open
from torch import nn

from loraswitch.adapter_config import (
    CONFIG_FILE,
    MAX_RANK,
    AdapterError,
    check_declared_rank,
    check_targets,
    read_config,
    scale_of,
    untrained_targets,
)

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
RESERVED_NAMES = ("auto", "base", "mixture")  # `model` values the server reads itself
MAX_RELATIVE_UPDATE = 100.0  # |scale B A|_F / |W|_F above this is refused (`_check_size`)
MAX_SCALE = 256.0  # |lora_alpha / r| (rsLoRA: / sqrt r) above this is refused; PEFT adapters use ~0.5-32
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
# base_model.model.<module>.lora_A[.<peft adapter name>].weight
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


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
    """Refuse a name a `model` string could not mean unambiguously: a reserved word in any case
    ("AUTO" would read as the router to a client and as the adapter to the server)."""
    if name.lower() in RESERVED_NAMES:
        raise AdapterError(name, f"the names {RESERVED_NAMES} are reserved in any case (they mean routing / no "
                                 "adapter / a weighted mix)")
    if not _NAME_RE.match(name):
        raise AdapterError(name, "names must be 1-128 characters of ASCII letters, digits, '_', '-', '.'")


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
        raise AdapterError(name, f"missing {WEIGHTS_FILE} in {path}", missing=True)
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
    cfg = read_config(name, path)
    tensors = _read_tensors(name, path)
    declared = cfg.get("base_model_name_or_path")
    wrong_base_hint = f" (the adapter was trained for {declared!r}: wrong base model?)" if declared else ""
    check_targets(name, cfg, base, wrong_base_hint)

    if any("lora_embedding" in key for key in tensors):  # before the embedding's saved base layer is met
        raise AdapterError(name, "LoRA on embedding layers is not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
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
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterError(name, f"module {module_name!r}: LoRA weights must be floating point "
                                     f"(got {A.dtype} / {B.dtype})")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(name, f"module {module_name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not form a low-rank pair")
        if A.shape[1] != target.in_features or B.shape[0] != target.out_features:
            raise AdapterError(
                name,
                f"module {module_name!r}: update is {B.shape[0]}x{A.shape[1]} but the base layer is "
                f"{target.out_features}x{target.in_features}{wrong_base_hint}",
            )
        if not 1 <= A.shape[0] <= MAX_RANK:
            raise AdapterError(name, f"module {module_name!r}: rank {A.shape[0]} (must be 1 to {MAX_RANK})")
        check_declared_rank(name, cfg, module_name, A.shape[0])
        modules[module_name] = _module(name, module_name, A, B, scale_of(cfg, module_name, A.shape[0]), dtype)
        _check_size(name, module_name, modules[module_name], target.weight)

    adapter = Adapter(name=name, modules=modules, config=cfg, path=path)
    lacking = untrained_targets(cfg, base, set(modules))
    if lacking:
        adapter.warnings.append(f"no weights for {len(lacking)} module(s) its target_modules name (e.g. {lacking[0]!r}): "
                                "they run without the adapter (PEFT warns of these missing keys too)")
    if declared and base_name and _family(declared) != _family(base_name):
        adapter.warnings.append(f"trained for {declared!r}, running on {base_name!r} (shapes match)")
    return adapter


def _module(name: str, key: str, A: torch.Tensor, B: torch.Tensor, scale: float, dtype: torch.dtype) -> LoraModule:
    """One module's factors, refused unless finite and sane in the dtype they will run in: a
    NaN anywhere in a batch's stacked factors (0 * NaN) reached every row batched with it."""
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise AdapterError(name, f"module {key!r}: scale {scale:g} (lora_alpha / r) is outside the sane range "
                                 f"|scale| <= {MAX_SCALE:g}")
    A, B = A.to(dtype), B.to(dtype)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise AdapterError(name, f"module {key!r} has NaN or Inf weights")
    if not torch.isfinite(B * scale).all():
        raise AdapterError(name, f"module {key!r}: its weights times scale {scale:g} overflow {dtype}")
    return LoraModule(A, B, scale)


def _check_size(name: str, key: str, module: LoraModule, weight: torch.Tensor) -> None:
    """Refuse an update that swamps the layer it adds to: finite factors 1e17 times too large
    pass every other check, and per-token routing (Arrow) then mixed them into every answer as
    non-finite logits. Trained adapters change a layer by a few percent to about its own size."""
    layer = _norm(weight)
    if not layer:  # an empty (or offloaded) layer: no size to compare with
        return
    A, B = module.A.double(), module.B.double()
    update = abs(module.scale) * float(torch.sqrt(torch.clamp(torch.trace((B.T @ B) @ (A @ A.T)), min=0)))
    if update > MAX_RELATIVE_UPDATE * layer:
        raise AdapterError(name, f"module {key!r}: its update is {update / layer:.3g} times the size of "
                                 f"the base weights (|scale B A| / |W|, at most {MAX_RELATIVE_UPDATE:g}): corrupt or "
                                 "mis-scaled weights")


def _norm(weight: torch.Tensor) -> float:
    """The Frobenius norm of a base weight, computed once per tensor and kept on it (every adapter
    of a library is checked against the same layers), in float32 without a full upcast copy."""
    if weight.is_meta:
        return 0.0
    norm = getattr(weight, "_loraswitch_norm", None)
    if norm is None:
        norm = float(torch.linalg.vector_norm(weight.detach(), dtype=torch.float32))
        weight._loraswitch_norm = norm
    return norm


def _family(model_name: str) -> str:
    """A loose identity for comparing base names: the last path part, lowercased, without
    quantization suffixes ('SmolLM2-135M-Instruct.Q4_1.gguf' ~ 'HuggingFaceTB/SmolLM2-135M-Instruct')."""
    stem = Path(str(model_name)).name.lower()
    return re.split(r"[.](?:q\d|f16|f32|bf16|gguf)", stem)[0]


def find_adapter_dirs(root: str | Path) -> list[Path]:
    """Adapter folders directly inside `root` (any subfolder with an adapter config or weights),
    or `root` itself when it is one. Folders inside an adapter folder are not adapters of the
    library: trainers write `checkpoint-*` there (PEFT's extra adapters of one model, `out/second/`,
    are given with `--adapter-dir out`)."""
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
    if not path.is_file():
        raise ValueError(f"{path}: no such example file" + (" (a folder)" if path.is_dir() else ""))
    rows: list[tuple[str, str | None]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), 1):
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
