"""Training one LoRA adapter from (prompt, answer) examples with PEFT, on the base model's device.

Only the answer tokens carry loss, and the language-model head is evaluated only at those
positions: with prompts left-padded, every row's answer sits at the end of the window, so
`logits_to_keep` trims the 49k-wide head (a fifth of SmolLM2's compute) to a few positions.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm

from loraswitch.base import Base
from loraswitch.padding import left_pad

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Recipe:
    """How one task's adapter is trained; recorded in the zoo manifest."""

    rank: int = 8
    alpha: int = 16
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJ))
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 10
    seed: int = 0
    n_train: int = 4000
    max_tokens: int = 512  # longer training rows (prompt + answer) are skipped, not truncated
    # 0: every layer; N: only the last N layers carry LoRA, so backward stops there (on CPU that
    # roughly halves a step for N = a third of the layers)
    top_layers: int = 0
    checks: int = 0  # validation checks over the run (the best is kept); 0: keep the last step

    def to_dict(self) -> dict:
        return asdict(self)


def _batch(rows: list[tuple[list[int], int]], pad_id: int, device: torch.device | None = None) -> dict:
    """Left-pad a batch; labels cover only the last `n_target` tokens of each row, and `keep`
    (the logits the head computes) spans the longest target plus the position before it."""
    padded = left_pad([ids for ids, _ in rows], pad_id)
    keep = max(n for _, n in rows) + 1
    labels = torch.full((len(rows), keep - 1), -100, dtype=torch.long)
    for i, (row, n_target) in enumerate(rows):
        labels[i, keep - 1 - n_target :] = torch.tensor(row[-n_target:])
    return {**padded.model_inputs(device), "labels": labels.to(device), "keep": keep}


def _lr_factor(recipe: Recipe, step: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress_frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))


def encode_all(base: Base, pairs: list[tuple[str, str]], max_tokens: int) -> tuple[list[tuple[list[int], int]], int]:
    """Encoded training rows, and how many were skipped as longer than `max_tokens`."""
    rows = [base.encode_example(p, a) for p, a in pairs]
    kept = [r for r in rows if len(r[0]) <= max_tokens]
    return kept, len(rows) - len(kept)


def lora_config(recipe: Recipe, base_name: str, n_layers: int | None = None) -> LoraConfig:
    layers = None
    if recipe.top_layers and n_layers:
        layers = list(range(max(0, n_layers - recipe.top_layers), n_layers))
    return LoraConfig(
        layers_to_transform=layers,
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=recipe.target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_name,
    )


def _answer_logits(model, batch: dict) -> torch.Tensor:
    # fp32 everywhere: under bf16 autocast on a GPU, a short-row task (strategyqa) hit NaN losses
    # within ten steps; the step there is bound by launch overhead, not arithmetic, anyway
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")},
                logits_to_keep=batch["keep"], use_cache=False)
    return out.logits[:, :-1].float()


@torch.no_grad()
def answer_exact_rate(model, rows: list[tuple[list[int], int]], pad_id: int, batch_size: int = 16) -> float:
    """Share of `rows` whose every answer token is the model's top-1 given the tokens before it:
    exactly the rows greedy decoding would answer word for word, in one forward pass per batch
    (no generation), so the trainer can pick its best checkpoint on the validation split."""
    device = next(model.parameters()).device
    hits = 0
    for i in range(0, len(rows), batch_size):
        batch = _batch(rows[i:i + batch_size], pad_id, device)
        pred = _answer_logits(model, batch).argmax(-1)
        labels = batch["labels"]
        hits += int(((pred == labels) | (labels == -100)).all(-1).sum())
    return hits / max(1, len(rows))


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def train_adapter(base: Base, pairs: list[tuple[str, str]], recipe: Recipe, out_dir: Path, name: str = "adapter",
                  progress: bool = True, val_pairs: list[tuple[str, str]] | None = None) -> dict:
    """Train an adapter on (prompt, answer) `pairs` and save it in PEFT format to `out_dir`, on
    the base model's device. With `val_pairs`, the weights are checked `recipe.checks` times
    (evenly spaced, the last at the end) by `answer_exact_rate` and the best check is saved
    (ties go to the later one): real tasks on a small base overfit in a few epochs. Returns
    training stats. The base model is left untouched: PEFT's wrapper is unloaded after saving.
    """
    torch.manual_seed(recipe.seed)
    rng = random.Random(recipe.seed)
    data, skipped = encode_all(base, pairs, recipe.max_tokens)
    if len(data) < recipe.batch_size:
        raise ValueError(f"{name}: {len(data)} training rows fit in {recipe.max_tokens} tokens, fewer than a batch")
    val = encode_all(base, val_pairs, recipe.max_tokens)[0] if val_pairs else []
    if next(base.model.parameters()).device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = get_peft_model(base.model, lora_config(recipe, base.name, base.model.config.num_hidden_layers))
    device, pad_id = next(base.model.parameters()).device, base.tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(_lr_factor, recipe))
    check_at = {round(recipe.steps * (i + 1) / recipe.checks) for i in range(recipe.checks)} if val else set()
    losses: list[float] = []
    checks: list[dict] = []
    best: tuple[float, int, dict] | None = None  # (val exact, step, LoRA weights)
    tokens, nonfinite, start = 0, 0, time.time()
    bar = tqdm(range(recipe.steps), desc=f"train {name}", disable=not progress, dynamic_ncols=True)
    for step in bar:
        model.train()
        batch = _batch(rng.sample(data, recipe.batch_size), pad_id, device)
        logits = _answer_logits(model, batch)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
        if not torch.isfinite(loss):  # never step on a NaN / inf loss: it would poison every weight
            nonfinite += 1
            opt.zero_grad(set_to_none=True)
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", tok_s=f"{tokens / (time.time() - start):.0f}")
        if step + 1 in check_at:
            model.eval()
            rate = answer_exact_rate(model, val, pad_id)
            checks.append({"step": step + 1, "val_exact": round(rate, 4)})
            if best is None or rate >= best[0]:
                best = (rate, step + 1, _lora_state(model))
    if best is not None:
        model.load_state_dict(best[2], strict=False)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    model.unload()  # restore the plain base modules for the next task
    stats = {
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "train_tokens": tokens,
        "train_seconds": round(time.time() - start, 1),
        "train_rows": len(data),
        "skipped_too_long": skipped,
        "device": str(device),
        "nonfinite_steps_skipped": nonfinite,
        # the token every target ends with: what the adapter learns to stop on (the BIG-bench
        # library's GPU run read another one than this machine does; docs/real-tasks.md)
        "end_of_turn": base.tokenizer.convert_ids_to_tokens(base.end_of_turn_id),
    }
    if checks:
        stats.update(val_checks=checks, kept_step=best[1])
    return stats
