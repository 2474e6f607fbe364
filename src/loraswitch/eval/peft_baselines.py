"""PEFT's own ways of using several adapters, on the same adapters, as baselines.

* `peft_linear`, `peft_ties`, `peft_dare_ties`, `peft_cat`: `add_weighted_adapter` over every
  adapter with equal weights (the same weights as the `merge_*` methods), one merged adapter
  answering every task. PEFT combines the factors A and B, not the dense updates: `linear` /
  `ties` / `dare_ties` sum or prune the factors separately (cross terms B_i A_j appear), `cat`
  concatenates them (exact weighted sum of the updates).
* `peft_xlora`: X-LoRA (`XLoraConfig`), its classifier trained on the demo suite's training
  prompts with the gate router's budget (answer-token LM loss, the adapters frozen). PEFT 0.21.2
  X-LoRA has no KV cache (every new token re-runs the whole sequence twice), so keep its item
  count small (`xlora_limit`).
* `peft_arrow`: PEFT's Arrow (`ArrowConfig`, `create_arrow_model`), zero-shot, top-3 by default.

PEFT's linear/ties/dare_ties and Arrow refuse adapters of different ranks or target modules,
and the demo library mixes both (rank 4 on q,v; rank 8 and 16 on all projections). Every PEFT
method therefore loads *harmonised copies*: each adapter zero-padded to the largest rank and to
the union of target modules, with its scale folded into B (lora_alpha = r, scale 1). Each copy
computes exactly its original adapter (zero rows and columns add nothing); the padding is
visible only to methods that look at the factors themselves (Arrow's prototype of an all-zero
module is the zero vector, so that adapter is never preferred there).

Each PEFT model is built on a fresh base from the context's factory and answered with
`model.generate` (greedy, same chat template and stop tokens as loraswitch).
"""

from __future__ import annotations

import gc
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from loraswitch.base import Base
from loraswitch.eval.data import Item
from loraswitch.eval.methods import EvalContext, Method, MethodSpec, merge_weights
from loraswitch.generate import Generation
from loraswitch.library import CONFIG_FILE, WEIGHTS_FILE, Adapter
from loraswitch.padding import left_pad, tail_targets

COMBINATIONS = {"linear": {}, "ties": {"density": 0.2}, "dare_ties": {"density": 0.5}, "cat": {}}


# ---------------------------------------------------------------------------- harmonised copies
def _target_modules(keys: list[str], model: nn.Module) -> list[str]:
    suffixes = sorted({k.rsplit(".", 1)[-1] for k in keys})
    matching = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in suffixes}
    return suffixes if matching == set(keys) else sorted(keys)


def harmonise(adapters: list[Adapter], out_dir: Path, model: nn.Module, base_name: str | None = None) -> dict[str, Path]:
    """Write every adapter as a PEFT folder with one common rank and target set (see module doc)."""
    keys = sorted({k for a in adapters for k in a.modules})
    rank = max(m.rank for a in adapters for m in a.modules.values())
    shapes = {}
    for a in adapters:
        for k, m in a.modules.items():
            shapes[k] = (m.B.shape[0], m.A.shape[1])
    targets = _target_modules(keys, model)
    paths = {}
    for a in adapters:
        tensors = {}
        for k in keys:
            out_f, in_f = shapes[k]
            A, B = torch.zeros(rank, in_f), torch.zeros(out_f, rank)
            m = a.modules.get(k)
            if m is not None:
                A[: m.rank] = m.A.float()
                B[:, : m.rank] = m.B.float() * m.scale
            tensors[f"base_model.model.{k}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.{k}.lora_B.weight"] = B.contiguous()
        path = out_dir / a.name
        path.mkdir(parents=True, exist_ok=True)
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, lora_dropout=0.0, bias="none",
                         task_type="CAUSAL_LM", base_model_name_or_path=base_name)
        cfg.save_pretrained(str(path))
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
        assert (path / CONFIG_FILE).is_file()
        paths[a.name] = path
    return paths


def harmonised_paths(ctx: EvalContext, base: Base) -> dict[str, Path]:
    """The harmonised copies of the library (written once per context into its scratch folder)."""
    cached = getattr(ctx, "_peft_paths", None)
    if cached is None:
        if ctx.scratch is None:
            raise RuntimeError("PEFT baselines need ctx.scratch (a temporary folder)")
        cached = harmonise(ctx.read_adapters(base), ctx.scratch / "peft_harmonised", base.model, base.name)
        ctx._peft_paths = cached  # type: ignore[attr-defined]
    return cached


def load_peft(base: Base, paths: dict[str, Path]) -> PeftModel:
    names = list(paths)
    model = PeftModel.from_pretrained(base.model, str(paths[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(paths[n]), adapter_name=n)
    return model.eval()


# ---------------------------------------------------------------------------- generation
@torch.inference_mode()
def hf_generate(model: nn.Module, base: Base, prompts: list[str], max_new_tokens: int, use_cache: bool = True,
                trace_fn=None) -> list[Generation]:
    """Greedy `model.generate` on chat-templated prompts, cut at the first stop token."""
    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    padded = left_pad([base.chat_ids(p) for p in prompts], pad)
    ids, mask = padded.input_ids, padded.attention_mask
    device = next(model.parameters()).device
    stop = sorted(base.stop_ids)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=stop, pad_token_id=pad, use_cache=use_cache,
                         temperature=None, top_p=None, top_k=None)
    new = out[:, ids.shape[1] :].tolist()
    traces = trace_fn(ids.shape[1], new) if trace_fn is not None else [[] for _ in new]
    answers = []
    for row, trace in zip(new, traces):
        n = next((i for i, t in enumerate(row) if t in stop), len(row))
        answers.append(Generation([], row[:n], tok.decode(row[:n], skip_special_tokens=True),
                                  "stop" if n < len(row) else "length", trace[: n + 1]))
    return answers


class PeftMethod(Method):
    family = "peft"
    use_cache = True

    def build(self, base: Base, paths: dict[str, Path]) -> nn.Module:
        raise NotImplementedError

    def setup(self) -> None:
        base = self.ctx.base_factory()
        paths = harmonised_paths(self.ctx, base)
        self.names = list(paths)
        self.base = base
        t0 = time.perf_counter()
        self.model = self.build(base, paths)
        self.info.setdefault("build_s", round(time.perf_counter() - t0, 2))
        self.info["adapters"] = self.names
        self.info["harmonised"] = "zero-padded to a common rank and target set, scale folded into B"

    def _trace_fn(self):
        return None

    def answer(self, items: list[Item]) -> list[Generation]:
        out: list[Generation | None] = [None] * len(items)
        by_len: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            by_len.setdefault(it.max_new_tokens, []).append(i)
        for n_new, idx in by_len.items():
            for j in range(0, len(idx), self.ctx.batch_size):
                chunk = idx[j : j + self.ctx.batch_size]
                answers = hf_generate(self.model, self.base, [items[i].prompt for i in chunk], n_new, self.use_cache,
                                      self._trace_fn())
                for i, a in zip(chunk, answers):
                    out[i] = a
                self.ctx.progress(len(chunk))
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None
        self.base = None
        gc.collect()


class PeftCombination(PeftMethod):
    combination = ""

    def build(self, base: Base, paths: dict[str, Path]) -> nn.Module:
        model = load_peft(base, paths)
        weights = merge_weights(self.combination, len(paths))
        extra = COMBINATIONS[self.combination]
        model.add_weighted_adapter(list(paths), weights, "merged", combination_type=self.combination, **extra)
        model.set_adapter("merged")
        for n in list(paths):
            model.delete_adapter(n)
        self.info.update({"weights": weights, **extra})
        return model


class PeftArrow(PeftMethod):
    name = "peft_arrow"
    top_k = 3

    def build(self, base: Base, paths: dict[str, Path]) -> nn.Module:
        from peft import ArrowConfig
        from peft.tuners.lora.arrow import create_arrow_model

        cfg = ArrowConfig(top_k=min(self.top_k, len(paths)), router_temperature=1.0, rng_seed=0)
        self.info["top_k"] = cfg.top_k
        return create_arrow_model(base.model, [str(p) for p in paths.values()], cfg).eval()


class PeftXLora(PeftMethod):
    name = "peft_xlora"
    routes = True  # its per-token scalings say which adapter dominates (never abstains)
    use_cache = False

    def build(self, base: Base, paths: dict[str, Path]) -> nn.Module:
        from peft import XLoraConfig, get_peft_model

        base.model.config.use_cache = False
        # PEFT 0.21.2 looks adapters up as "0".."N-1" internally: key the dict that way
        cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.model.config.hidden_size, xlora_depth=1,
                          adapters={str(i): str(p) for i, p in enumerate(paths.values())}, layerwise_scalings=False)
        model = get_peft_model(base.model, cfg)
        t0 = time.perf_counter()
        self.info["training"] = train_xlora(model, base, self.names, self.ctx.suite, self.ctx.xlora_train_per_adapter,
                                             self.ctx.xlora_epochs)
        self.info["train_s"] = round(time.perf_counter() - t0, 2)
        return model.eval()

    def _trace_fn(self):
        names = self.names
        xlora = self.model.base_model

        def trace(prompt_width: int, new: list[list[int]]) -> list[list[dict]]:
            s = getattr(xlora, "internal_xlora_scalings", None)  # [B, S, layers, adapters] of the last forward
            if s is None:
                return [[] for _ in new]
            w = s.float().mean(2)  # over layers
            out = []
            for b, row in enumerate(new):
                steps = []
                for k in range(len(row)):
                    p = prompt_width - 1 + k
                    if p >= w.shape[1]:
                        break
                    steps.append({"adapters": {names[e]: round(float(v), 4) for e, v in enumerate(w[b, p]) if v >= 0.05}})
                out.append(steps)
            return out

        return trace


MICRO_BATCH = 2  # rows per forward/backward while training X-LoRA's classifier


def train_xlora(model: nn.Module, base: Base, names: list[str], suite, per_adapter: int, epochs: int,
                batch_size: int = 8, lr: float = 5e-3, seed: int = 0) -> dict:
    """Train X-LoRA's classifier (only) with next-token loss on the answers of `suite`'s training
    prompts of every adapter named after one of its tasks."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = base.tokenizer
    rows = [base.encode_example(e.prompt, e.answer) for name in names if name in suite.task_names
            for e in suite.examples(name, "train", per_adapter, seed=seed)]
    params = [p for p in model.parameters() if p.requires_grad]
    if not rows or not params:
        return {"steps": 0, "examples": 0}
    opt = torch.optim.Adam(params, lr=lr)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    losses, steps = [], 0
    model.train()
    bar = tqdm(total=epochs * ((len(rows) + batch_size - 1) // batch_size), desc="train X-LoRA classifier", leave=False)
    for _ in range(epochs):
        rng.shuffle(rows)
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            total = sum(r[1] for r in batch)  # answer tokens of the batch: the loss is their mean
            opt.zero_grad()
            loss = 0.0
            # micro-batches, gradients accumulated: long BIG-bench prompts, 8 at once, with full
            # logits and backward through the model twice (X-LoRA's scaling pass) exhaust the RAM
            for k in range(0, len(batch), MICRO_BATCH):
                chunk = batch[k : k + MICRO_BATCH]
                padded = left_pad([r[0] for r in chunk], pad)
                target = tail_targets([r[0] for r in chunk], [r[1] for r in chunk])
                n_ans = target.shape[1]
                out = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, use_cache=False)
                logits = out.logits[:, -n_ans - 1 : -1]
                part = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                         reduction="sum") / total
                part.backward()
                loss += float(part)
            opt.step()
            losses.append(loss)
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return {"steps": steps, "examples": len(rows), "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "final_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4)}


PEFT_METHODS = [
    *(MethodSpec(f"peft_{ct}", "peft", type(f"Peft{ct.title()}", (PeftCombination,), {"name": f"peft_{ct}", "combination": ct}),
                 f"PEFT add_weighted_adapter combination_type={ct}, equal weights") for ct in COMBINATIONS),
    MethodSpec("peft_arrow", "peft", PeftArrow, "PEFT Arrow (create_arrow_model, top_k=3), zero-shot"),
    MethodSpec("peft_xlora", "peft", PeftXLora, "PEFT X-LoRA, classifier trained with the gate router's budget; no KV cache"),
]
