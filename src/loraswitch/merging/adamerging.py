"""AdaMerging (Yang et al. 2024): learn the task-arithmetic coefficients without labels, by
minimising the Shannon entropy of the merged model's predictions on unlabeled prompts.

Why this reuses the engine instead of building merged weights: a dense mixture of adapters with
weights lambda is exactly what the engine's routing computes,

    y = W x + sum_e lambda_e * s_e B_e A_e x  =  (W + sum_e lambda_e dW_e) x,

so the task-arithmetic merge with coefficients lambda IS a forward pass with routing weights
lambda on every token, and `kernels.add_lora` is autograd-safe when grad is enabled. Layer-wise
coefficients are a `dynamic` router (see `layers.RoutingContext`) that hands each module the
Routing of its coefficient group, whose weights are the learnable parameters. No dense merged
matrix is ever formed during training; the low-rank factors stay low-rank. Once learned, the
coefficients give the merged update by task arithmetic: dW = sum_e lambda_{e, group} dW_e.

Where the entropy is taken: the adapters were trained to produce answers, so the predictions
that matter are those of answer tokens. A few answer tokens are generated once, greedily, under
the initial coefficients, and the entropy is averaged over the predictions of those tokens (from
the last prompt position on). With `gen_tokens: 0` only the first answer token is scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from loraswitch.base import Base
from loraswitch.engine import Engine
from loraswitch.generate import FixedPolicy, SamplingParams, generate
from loraswitch.kernels import Routing
from loraswitch.layers import MultiLoRALinear
from loraswitch.library import Adapter, adapter_examples, read_examples
from loraswitch.merging.config import ADAMERGING_PARAMS
from loraswitch.merging.deltas import module_deltas, module_union
from loraswitch.padding import left_pad

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class AdaMergingResult:
    """Learned coefficients [n_groups, n_adapters] and the entropy before, during and after."""

    adapters: list[str]
    granularity: str
    groups: list[str]
    module_group: dict[str, int]
    coefficients: Tensor
    initial: Tensor
    entropy_before: float
    entropy_after: float
    history: list[float] = field(default_factory=list)
    n_prompts: int = 0
    n_scored: int = 0

    def coefficient(self, adapter: str, group: int = 0) -> float:
        return float(self.coefficients[group, self.adapters.index(adapter)])

    def merged_deltas(self, adapters: list[Adapter]) -> dict[str, Tensor]:
        """Task arithmetic with the learned coefficients: dW = sum_e lambda_{e,g(module)} dW_e."""
        out = {}
        for key in module_union(adapters):
            coefs = self.coefficients[self.module_group[key]].tolist()
            out[key] = sum(c * d for c, d in zip(coefs, module_deltas(adapters, key), strict=True))
        return out

    def to_dict(self) -> dict[str, Any]:
        table = {g: {a: round(float(c), 6) for a, c in zip(self.adapters, row, strict=True)}
                 for g, row in zip(self.groups, self.coefficients, strict=True)}
        return {
            "granularity": self.granularity,
            "coefficients": table,
            "initial": {a: round(float(c), 6) for a, c in zip(self.adapters, self.initial[0], strict=True)},
            "entropy_before": self.entropy_before,
            "entropy_after": self.entropy_after,
            "entropy_history": [round(h, 5) for h in self.history],
            "n_prompts": self.n_prompts,
            "n_scored_predictions": self.n_scored,
        }


def coefficient_groups(modules: list[str], granularity: str) -> tuple[list[str], dict[str, int]]:
    """Which coefficient each module uses: one for all (task-wise), one per decoder layer
    (layer-wise; modules outside numbered layers share an 'other' group), or one per module."""
    if granularity == "task":
        return ["all"], dict.fromkeys(modules, 0)
    if granularity == "module":
        return list(modules), {m: i for i, m in enumerate(modules)}
    if granularity != "layer":
        raise ValueError(f"granularity must be task, layer or module, got {granularity!r}")

    def label(m: str) -> str:
        match = _LAYER_RE.search(m)
        return f"layer {int(match.group(1))}" if match else "other"

    labels = sorted({label(m) for m in modules}, key=lambda s: (s == "other", int(s.split()[1]) if s != "other" else 0))
    index = {lab: i for i, lab in enumerate(labels)}
    return labels, {m: index[label(m)] for m in modules}


def unlabeled_prompts(base: Base, adapters: list[Adapter], params: dict[str, Any]) -> list[list[int]]:
    """Chat-formatted prompt ids to take the entropy on: the config's `prompts`, else the lines of
    its `prompts_file`, else the example prompts shipped in the adapters' folders (`examples.jsonl`
    / `examples.txt`, the first `n_prompts` of each). AdaMerging needs no labels, but it does
    need prompts of the adapters' tasks; without any it refuses rather than guess."""
    texts = list(params.get("prompts") or [])
    if not texts and params.get("prompts_file"):
        texts = [p for p, _ in read_examples(params["prompts_file"])]
    if not texts:
        n = int(params["n_prompts"])
        texts = [p for a in adapters for p, _ in adapter_examples(a)[:n]]
    if not texts:
        raise ValueError("adamerging needs unlabeled prompts of the adapters' tasks: set parameters.prompts or "
                         "parameters.prompts_file, or ship examples.jsonl / examples.txt in the adapter folders")
    return [base.chat_ids(t) for t in texts]


class CoefficientRouter:
    """A dynamic router whose per-module Routing weights are the learnable coefficients.

    One Routing per (coefficient group, token count) per forward pass, shared by the modules of
    the group so they share its pair/group bookkeeping; `reset()` before each forward because
    the coefficients change between steps.
    """

    def __init__(self, coef: Tensor, module_group: dict[str, int], slots: list[int]):
        self.coef = coef
        self.module_group = module_group
        # with one adapter, a weight of exactly 1 would take the kernels' "uniform" fast path, which
        # ignores the weights (and their gradient): an inert -1 column keeps the weighted path
        self.ids = torch.tensor(slots + ([-1] if len(slots) == 1 else []), dtype=torch.long)
        self._cache: dict[tuple[int, int], Routing] = {}

    def reset(self) -> None:
        self._cache.clear()

    def __call__(self, key: str, x: Tensor) -> Routing | None:
        group = self.module_group.get(key)
        if group is None:
            return None
        n = x.numel() // x.shape[-1]  # the layer hands its input as [batch, seq, hidden]
        routing = self._cache.get((group, n))
        if routing is None:
            w = self.coef[group]
            # the kernels skip weights that are exactly 0; a negligible offset (gradient 1) keeps a
            # coefficient projected onto 0 in the computation, so the gradient can still raise it
            w = w + w.detach().eq(0).to(w.dtype) * 1e-12
            if len(self.ids) > w.shape[0]:
                w = torch.cat([w, w.new_zeros(1)])
            routing = Routing(self.ids.expand(n, -1), w.unsqueeze(0).expand(n, -1))
            self._cache[(group, n)] = routing
        return routing


@dataclass
class _Batch:
    ids: Tensor
    mask: Tensor
    positions: Tensor
    scored: Tensor  # [B, keep] bool: which of the last `keep` positions are answer predictions
    keep: int


def _make_batch(seqs: list[list[int]], n_scored: list[int], pad_id: int) -> _Batch:
    padded = left_pad(seqs, pad_id)
    keep = max(n_scored)
    scored = torch.zeros((len(seqs), keep), dtype=torch.bool)
    for i, k in enumerate(n_scored):
        scored[i, keep - k:] = True
    return _Batch(padded.input_ids, padded.attention_mask, padded.position_ids, scored, keep)


def _entropy_sum(engine: Engine, router: CoefficientRouter, batch: _Batch) -> tuple[Tensor, int]:
    """Summed Shannon entropy (nats) of the scored next-token distributions, and their count."""
    router.reset()
    with engine.routed(dynamic=router):
        out = engine.model(input_ids=batch.ids, attention_mask=batch.mask, position_ids=batch.positions,
                           use_cache=False, logits_to_keep=batch.keep)
    logp = out.logits.float().log_softmax(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return (ent * batch.scored).sum(), int(batch.scored.sum())


def _unwrap(engine: Engine) -> None:
    """Put the original nn.Linear modules back, so the base model is left as it was found."""
    for key, layer in engine.layers.items():
        parent_name, _, child = key.rpartition(".")
        parent = engine.model.get_submodule(parent_name) if parent_name else engine.model
        setattr(parent, child, layer.base)


def _scored_sequences(engine: Engine, prompts: list[list[int]], slots: list[int], weights: list[float],
                      gen_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Each prompt followed by `gen_tokens` answer tokens generated once, greedily, under the
    initial coefficients, and how many predictions per sequence the entropy is taken on (the
    answer tokens' and the one after the prompt)."""
    answers: list[list[int]] = [[] for _ in prompts]
    if gen_tokens > 0:
        gens = generate(engine, prompts, FixedPolicy([(slots, weights)] * len(prompts)), SamplingParams(max_new_tokens=gen_tokens))
        answers = [g.token_ids for g in gens]
    return [q + a for q, a in zip(prompts, answers, strict=True)], [len(a) + 1 for a in answers]


def adamerge(
    base: Base,
    adapters: list[Adapter],
    weights: list[float],
    params: dict[str, Any] | None = None,
    progress: bool = True,
) -> AdaMergingResult:
    """Learn AdaMerging coefficients for `adapters` on `base` (see the module docstring).

    `params` are the YAML parameters (defaults in `config.ADAMERGING_PARAMS`); the coefficients
    start at `init`, or at the adapters' `weights` when `init` is not given.
    """
    p = {**ADAMERGING_PARAMS, "seed": 0, **(params or {})}
    names = [a.name for a in adapters]
    modules = module_union(adapters)
    groups, module_group = coefficient_groups(modules, p["granularity"])
    start = [float(p["init"])] * len(adapters) if p["init"] is not None else [float(w) for w in weights]
    max_coef = float(p["max_coef"])
    initial = torch.tensor(start).clamp(0, max_coef).expand(len(groups), -1).clone()
    coef = torch.nn.Parameter(initial.clone())

    if any(isinstance(m, MultiLoRALinear) for m in base.model.modules()):
        # its layers already belong to another engine: training here would overwrite that engine's
        # adapter slots and route through its context, not ours
        raise ValueError("adamerging needs a base model no engine has wrapped yet (load a fresh Base)")
    engine = Engine(base)
    frozen = [(q, q.requires_grad) for q in base.model.parameters()]
    for q, _ in frozen:
        q.requires_grad_(False)
    try:
        for a in adapters:
            engine.add_adapter(a)
        slots = [engine.slot_of(n) for n in names]
        router = CoefficientRouter(coef, module_group, slots)
        prompts = unlabeled_prompts(base, adapters, p)
        seqs, n_scored = _scored_sequences(engine, prompts, slots, initial[0].tolist(), int(p["gen_tokens"]))
        pad_id = base.tokenizer.pad_token_id or 0
        bs = int(p["batch_size"])

        def mean_entropy() -> float:
            total, count = 0.0, 0
            with torch.no_grad():
                for i in range(0, len(seqs), bs):
                    s, c = _entropy_sum(engine, router, _make_batch(seqs[i:i + bs], n_scored[i:i + bs], pad_id))
                    total, count = total + float(s), count + c
            return total / max(count, 1)

        before = mean_entropy()
        opt = torch.optim.Adam([coef], lr=float(p["lr"]))
        gen = torch.Generator().manual_seed(int(p["seed"]))
        order: list[int] = []
        history: list[float] = []
        bar = tqdm(range(int(p["steps"])), desc=f"adamerging ({p['granularity']}-wise)", unit="step", disable=not progress)
        for _ in bar:
            while len(order) < min(bs, len(seqs)):
                order += torch.randperm(len(seqs), generator=gen).tolist()
            idx, order = order[:bs], order[bs:]
            s, c = _entropy_sum(engine, router, _make_batch([seqs[i] for i in idx], [n_scored[i] for i in idx], pad_id))
            loss = s / c
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                coef.clamp_(0.0, max_coef)  # projected gradient descent, as in the paper
            history.append(loss.item())
            bar.set_postfix(entropy=f"{history[-1]:.4f}")
        after = mean_entropy()
    finally:
        _unwrap(engine)
        for q, flag in frozen:
            q.requires_grad_(flag)
    return AdaMergingResult(
        adapters=names, granularity=p["granularity"], groups=groups, module_group=module_group,
        coefficients=coef.detach().clone(), initial=initial, entropy_before=before, entropy_after=after,
        history=history, n_prompts=len(prompts), n_scored=sum(n_scored),
    )
