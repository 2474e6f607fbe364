"""The merge YAML (mergekit-like): parsing and validation with errors that say what to fix.

```yaml
method: ties                      # linear | ties | dare_linear | dare_ties | pcb | adamerging
adapters:                         # names found in adapter_dirs, or paths to adapter folders
  - {name: iso_date, weight: 1.0}
  - add                           # a bare name means weight 1.0
adapter_dirs: [src/loraswitch/libraries/demo/adapters]   # optional; default: the demo library
base: null                        # optional; default: the embedded base (CLI --base overrides)
parameters: {density: 0.2, lambda: 1.0, seed: 0}
output: {rank: 16, format: adapter}            # adapter | model; rank: int or "full"
```

Everything is checked before the base model is loaded, so a typo costs a second, not a model
load: unknown keys, unknown methods or parameters, out-of-range values, adapters that cannot be
found. Each problem raises one `ConfigError` naming the key and the allowed values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraswitch.library import MAX_RANK, find_adapter_dirs
from loraswitch.merging.methods import METHODS

ADAMERGING = "adamerging"
FORMATS = ("adapter", "model")
GRANULARITIES = ("task", "layer", "module")
COMMON_PARAMS: dict[str, Any] = {"lambda": 1.0, "seed": 0}
# AdaMerging is not a per-module function (it trains coefficients through the model), so its
# parameters live here rather than in the per-module registry.
ADAMERGING_PARAMS: dict[str, Any] = {
    "granularity": "task",  # task: one coefficient per adapter; layer: per adapter and decoder layer
    "steps": 100,
    "lr": 5e-3,
    "batch_size": 8,
    "n_prompts": 16,  # unlabeled prompts per adapter, from its folder's examples file
    "gen_tokens": 8,  # answer tokens generated once, whose predictions the entropy is taken on
    "init": None,  # initial coefficient for every adapter; None: the adapters' weights
    "max_coef": 1.0,  # coefficients are projected to [0, max_coef] after each step (as in the paper)
    "prompts": None,  # explicit unlabeled prompts (list of strings)
    "prompts_file": None,  # or a file of them (.txt one per line, .jsonl {"prompt": ...} per line)
}
TOP_KEYS = ("method", "adapters", "adapter_dirs", "base", "parameters", "output")


class ConfigError(ValueError):
    """The merge configuration is invalid; the message says which key and why."""


@dataclass
class AdapterSpec:
    name: str
    weight: float = 1.0
    path: Path | None = None  # filled by `resolve_adapters`


@dataclass
class OutputSpec:
    format: str = "adapter"
    rank: int | str = 16  # a positive int, or "full" (the smallest rank that is exact)


@dataclass
class MergeConfig:
    method: str
    adapters: list[AdapterSpec]
    parameters: dict[str, Any]
    output: OutputSpec = field(default_factory=OutputSpec)
    adapter_dirs: list[Path] = field(default_factory=list)
    base: str | None = None

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.adapters]

    @property
    def weights(self) -> list[float]:
        return [a.weight for a in self.adapters]


def method_params(method: str) -> dict[str, Any]:
    """The parameters `method` accepts, with their defaults."""
    if method == ADAMERGING:  # the coefficients ARE the scaling: no separate lambda
        return {"seed": COMMON_PARAMS["seed"], **ADAMERGING_PARAMS}
    return {**COMMON_PARAMS, **METHODS[method].params}


def known_methods() -> list[str]:
    return [*METHODS, ADAMERGING]


# a number YAML 1.1 reads as a string: an exponent without a dot ("1e-3")
_EXPONENT = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d+")
MAX_WEIGHT = 100.0  # an adapter's weight, as a mixture's on the server: beyond it the sum is no adapter


def _number(key: str, value: Any, *, integer: bool = False) -> float | int:
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    if integer and int(value) != value:
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return int(value) if integer else float(value)


def _check_range(key: str, value: float, lo: float | None, hi: float | None, lo_open: bool = False) -> None:
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        raise ConfigError(f"{key} must be in {left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}], got {value}")


def _parse_params(method: str, raw: Any, base_dir: Path | None = None) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"parameters must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    allowed = method_params(method)
    if "drop_rate" in raw and "density" in allowed and method.startswith("dare"):  # DARE's p, spelled as in the paper
        if "density" in raw:
            raise ConfigError("give parameters.density or parameters.drop_rate, not both (density = 1 - drop_rate)")
        p = _number("parameters.drop_rate", raw.pop("drop_rate"))
        _check_range("parameters.drop_rate", p, 0.0, 1.0)
        if p >= 1.0:
            raise ConfigError("parameters.drop_rate must be below 1 (dropping everything leaves nothing to merge)")
        raw["density"] = 1.0 - p
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for method {method!r} (allowed: {', '.join(allowed)})")
    params = {**allowed, **raw}
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"parameters.{key}"
        if key == "lambda":
            out[key] = _number(name, value)
        elif key == "seed":
            out[key] = _number(name, value, integer=True)
        elif key == "density":
            out[key] = _number(name, value)
            _check_range(name, out[key], 0.0, 1.0, lo_open=True)
        elif key in ("steps", "batch_size", "n_prompts", "gen_tokens"):
            out[key] = _number(name, value, integer=True)
            _check_range(name, out[key], 0 if key == "gen_tokens" else 1, None)
        elif key in ("lr", "max_coef"):
            out[key] = _number(name, value)
            _check_range(name, out[key], 0.0, None, lo_open=True)
        elif key == "init":
            out[key] = None if value is None else _number(name, value)
            if out[key] is not None:
                _check_range(name, out[key], 0.0, _number("parameters.max_coef", params.get("max_coef", 1.0)))
        elif key == "granularity":
            if value not in GRANULARITIES:
                raise ConfigError(f"{name} must be one of {', '.join(GRANULARITIES)}, got {value!r}")
            out[key] = value
        elif key == "prompts_file":
            out[key] = None if value is None else str(_prompts_file(name, value, base_dir))
        elif key == "prompts":
            if value is not None and (not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value)):
                raise ConfigError(f"{name} must be a non-empty list of strings, got {value!r}")
            out[key] = value
        else:  # a registered method's own parameter: numbers only
            out[key] = _number(name, value)
    return out


def _prompts_file(name: str, value: Any, base_dir: Path | None) -> Path:
    """AdaMerging's prompts file: from the working directory, else beside the YAML."""
    path = _resolve_dir(value, base_dir, name) if isinstance(value, str) and value else None
    if path is None or not path.is_file() or path.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"{name} must name an existing .txt or .jsonl file, got {value!r}")
    return path


def _parse_adapters(raw: Any) -> list[AdapterSpec]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("adapters must be a non-empty list of names (or {name: ..., weight: ...} mappings)")
    specs: list[AdapterSpec] = []
    for i, item in enumerate(raw):
        where = f"adapters[{i}]"
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a name or a mapping with 'name' and optional 'weight', got {item!r}")
        unknown = sorted(set(item) - {"name", "weight"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown} (allowed: name, weight)")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where} needs a 'name' (an adapter name or a path)")
        weight = _number(f"{where}.weight", item.get("weight", 1.0))
        _check_range(f"{where}.weight", weight, -MAX_WEIGHT, MAX_WEIGHT)
        specs.append(AdapterSpec(name=name.strip(), weight=weight))
    if specs and not any(s.weight for s in specs):
        raise ConfigError("every adapter's weight is 0: the merge would change nothing")
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ConfigError(f"adapter {s.name!r} is listed twice; give it once with the summed weight")
        seen.add(s.name)
    return specs


def _parse_output(raw: Any) -> OutputSpec:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"output must be a mapping like {{rank: 16, format: adapter}}, got {raw!r}")
    unknown = sorted(set(raw) - {"rank", "format"})
    if unknown:
        raise ConfigError(f"output: unknown key(s) {unknown} (allowed: rank, format)")
    fmt = raw.get("format", "adapter")
    if fmt not in FORMATS:
        raise ConfigError(f"output.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rank = raw.get("rank", 16)
    if rank != "full" and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK):
        raise ConfigError(f"output.rank must be an integer from 1 to {MAX_RANK} (what an adapter may have) or "
                          f"'full', got {rank!r}")
    return OutputSpec(format=fmt, rank=rank)


def _resolve_dir(value: Any, base_dir: Path | None, key: str) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ConfigError(f"{key} must be a path, got {value!r}")
    path = Path(value).expanduser()
    # relative paths: as written from the working directory (like mergekit), else next to the YAML
    if not path.is_absolute() and not path.exists() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    return path


def parse_config(raw: Any, base_dir: Path | None = None) -> MergeConfig:
    """Validate a loaded YAML document (a dict) into a MergeConfig; `base_dir` is the YAML's folder."""
    if not isinstance(raw, dict):
        raise ConfigError("the merge config must be a YAML mapping with at least 'method' and 'adapters'")
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} (allowed: {', '.join(TOP_KEYS)})")
    method = raw.get("method")
    if method not in known_methods():
        raise ConfigError(f"unknown method {method!r} (known: {', '.join(known_methods())})")
    adapters = _parse_adapters(raw.get("adapters"))
    dirs_raw = raw.get("adapter_dirs")
    if dirs_raw is None:
        from loraswitch.constants import DEMO_ADAPTER_DIR

        dirs = [DEMO_ADAPTER_DIR]
    else:
        if isinstance(dirs_raw, str):
            dirs_raw = [dirs_raw]
        if not isinstance(dirs_raw, list):
            raise ConfigError(f"adapter_dirs must be a list of folders, got {dirs_raw!r}")
        dirs = [_resolve_dir(d, base_dir, f"adapter_dirs[{i}]") for i, d in enumerate(dirs_raw)]
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"base must be a model directory or .gguf path, got {base!r}")
    cfg = MergeConfig(method, adapters, _parse_params(method, raw.get("parameters"), base_dir),
                      _parse_output(raw.get("output")), dirs, base)
    resolve_adapters(cfg, base_dir)
    return cfg


def resolve_adapters(cfg: MergeConfig, base_dir: Path | None = None) -> None:
    """Find each adapter's folder: a name in `adapter_dirs`, or a path to an adapter folder."""
    available: dict[str, Path] = {}
    for d in cfg.adapter_dirs:
        for p in find_adapter_dirs(d):
            available.setdefault(p.name, p)
    for spec in cfg.adapters:
        if spec.name in available:
            spec.path = available[spec.name]
            continue
        path = _resolve_dir(spec.name, base_dir, "adapter")
        if path.is_dir() and find_adapter_dirs(path) == [path]:
            spec.path = path
            spec.name = path.name
            continue
        missing = [str(d) for d in cfg.adapter_dirs if not Path(d).is_dir()]
        hint = f"; these adapter_dirs do not exist: {', '.join(missing)}" if missing else ""
        raise ConfigError(
            f"unknown adapter {spec.name!r}: not in adapter_dirs ({', '.join(map(str, cfg.adapter_dirs))}) "
            f"and not a path to an adapter folder (available: {', '.join(sorted(available)) or 'none'}){hint}"
        )
    paths = [s.path.resolve() for s in cfg.adapters]
    dup = sorted({s.name for s, p in zip(cfg.adapters, paths) if paths.count(p) > 1})
    if dup:
        raise ConfigError(f"adapter(s) {dup} are given twice (once by name and once by path, or twice by path)")
    _tell_apart(cfg.adapters)


def _tell_apart(specs: list[AdapterSpec]) -> None:
    """Name apart different folders of the same name (runs/a/final, runs/b/final: every training
    run's output is called alike) by the folders above them, "a-final" and "b-final": as many as
    it takes, so the merge's summary and its output's metadata say which is which."""
    for depth in range(2, 64):
        names = [s.name for s in specs]
        clashing = [s for s in specs if names.count(s.name) > 1]
        if not clashing:
            return
        for s in clashing:
            parts = [re.sub(r"[^A-Za-z0-9_.\-]", "_", x) for x in s.path.parts[-depth:] if x not in ("/", "")]
            s.name = "-".join(parts)[-128:].lstrip("-_.") or s.name


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a merge YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"merge config {str(path)!r} does not exist")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text (a merge config is a YAML file)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    return parse_config(raw, path.parent)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error (the last one silently won:
    `method: ties` then `method: linear` ran linear)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)
