"""What a PEFT LoRA `adapter_config.json` says, checked: the fields `library.read_adapter` reads
(with the types PEFT writes), the targets against the base model, each module's scale and rank.
Every refusal is an `AdapterError` naming the adapter and the reason (the library re-exports it)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from peft.utils.other import get_pattern_key
from torch import nn

CONFIG_FILE = "adapter_config.json"
MAX_RANK = 1024  # r (config or tensors) above this is refused: an r of 100000 is a typo or an attack


class AdapterError(ValueError):
    """An adapter was refused; `str()` says which one and exactly why."""

    def __init__(self, name: str, reason: str, missing: bool = False):
        super().__init__(f"adapter {name!r}: {reason}")
        self.name = name
        self.reason = reason
        # no adapter folder there at all (no such directory, no config, no weights): a server
        # says only "cannot load", so callers cannot probe which paths exist on its disk
        self.missing = missing


def read_config(name: str, path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterError(name, f"{path} is not a directory", missing=True)
    if not cfg_path.is_file():
        raise AdapterError(name, f"missing {CONFIG_FILE} in {path}", missing=True)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(name, f"corrupt {CONFIG_FILE}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(name, f"corrupt {CONFIG_FILE}: expected a JSON object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(name, f"peft_type {cfg.get('peft_type')!r} is not LoRA; only LoRA adapters are supported")
    _check_config(name, cfg)
    if cfg.get("use_dora"):
        raise AdapterError(name, "DoRA adapters (use_dora=true) are not supported yet")
    if cfg.get("lora_bias"):
        raise AdapterError(name, "LoRA with a bias on B (lora_bias=true) is not supported")
    return cfg


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_rank(name: str, what: str, r) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise AdapterError(name, f"{what} must be an integer from 1 to {MAX_RANK} (got {r!r})")


def _check_config(name: str, cfg: dict) -> None:
    """Every config field we read has the type PEFT writes: a string where a number belongs
    used to crash at load (500), and a NaN / inf / 1e30 alpha loaded and poisoned the batch."""
    _check_rank(name, "r", cfg.get("r"))
    alpha = cfg.get("lora_alpha", cfg["r"])
    if not _is_number(alpha):
        raise AdapterError(name, f"lora_alpha must be a finite number (got {alpha!r})")
    for field_name, check in (("alpha_pattern", _is_number), ("rank_pattern", None)):
        patterns = cfg.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(name, f"{field_name} must be an object of module pattern -> value (got {patterns!r})")
        for key, value in patterns.items():
            if check is not None and not check(value):
                raise AdapterError(name, f"{field_name}[{key!r}] must be a finite number (got {value!r})")
            if check is None:
                _check_rank(name, f"rank_pattern[{key!r}]", value)
    for flag in ("use_rslora", "use_dora", "lora_bias"):
        if cfg.get(flag) is not None and not isinstance(cfg[flag], bool):
            raise AdapterError(name, f"{flag} must be true or false (got {cfg[flag]!r})")
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise AdapterError(name, f"target_modules must be a list of module names or a regex (got {targets!r})")


def check_targets(name: str, cfg: dict, base: nn.Module, hint: str) -> None:
    """Target modules the base model lacks mean an adapter made for another architecture: PEFT
    matches a listed name against the end of each module's path, a string as a full regex."""
    targets = cfg.get("target_modules")
    if targets is None or targets == "all-linear":
        return
    names = [n for n, _ in base.named_modules()]
    if isinstance(targets, str):
        try:
            found = any(re.fullmatch(targets, n) for n in names)
        except re.error as exc:
            raise AdapterError(name, f"target_modules {targets!r} is not a valid regex: {exc}") from None
        if not found:
            raise AdapterError(name, f"target_modules {targets!r} matches no module of the base model{hint}")
        return
    lacking = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if lacking:
        raise AdapterError(name, f"targets modules the base model does not have: {', '.join(lacking)}{hint}")


def scale_of(cfg: dict, module: str, rank: int) -> float:
    """PEFT's scaling for one module: alpha / r, or alpha / sqrt(r) with rsLoRA; per-module
    overrides from alpha_pattern apply (rank_pattern is already visible in the tensor shapes)."""
    alpha = cfg.get("lora_alpha", cfg["r"])
    patterns = cfg.get("alpha_pattern") or {}
    if patterns:
        key = get_pattern_key(list(patterns), module)
        alpha = patterns.get(key, alpha)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def check_declared_rank(name: str, cfg: dict, module: str, rank: int) -> None:
    """The rank the config gives a module (`rank_pattern`, else `r`) is its factors' rank: PEFT
    refuses a mismatch (size mismatch at load), and the scale alpha / r would be wrong for one."""
    patterns = cfg.get("rank_pattern") or {}
    declared = patterns.get(get_pattern_key(list(patterns), module), cfg["r"]) if patterns else cfg["r"]
    if declared != rank:
        where = "rank_pattern" if patterns and declared != cfg["r"] else "r"
        raise AdapterError(name, f"module {module!r}: adapter_config.json says {where} {declared} but its lora_A has "
                                 f"rank {rank}: the config does not belong to these weights")


def untrained_targets(cfg: dict, base: nn.Module, found: set[str]) -> list[str]:
    """Linear modules a listed `target_modules` names that have no factors in the file (a
    partial or damaged save). Not judged where layers_to_transform / layers_pattern /
    exclude_modules narrow the targets."""
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or any(cfg.get(k) for k in ("layers_to_transform", "layers_pattern",
                                                                   "exclude_modules")):
        return []
    return [n for n, m in base.named_modules() if n not in found and _linear(m)
            and any(n == t or n.endswith("." + t) for t in targets)]


def _linear(module: nn.Module) -> bool:
    """An nn.Linear, or a running engine's wrapper around one (hot-loading)."""
    return isinstance(module, nn.Linear) or isinstance(getattr(module, "base", None), nn.Linear)
