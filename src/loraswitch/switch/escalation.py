"""Deciding, per request, who answers: an adapter, the base model, or the upstream model.

The decision is one number, the *risk* that the local answer is poor, against one threshold:

* the router picks an adapter with calibrated probability `c`: risk = 1 - c (the router's own
  estimate that the prompt is not that adapter's task);
* the router abstains to the base model: risk = 1 - (1 - p_missing) * (1 - u), where `p_missing`
  is the router's probability that the prompt belongs to a task it was trained on whose adapter is
  not loaded here (an edge server holding part of a library), and `u` is the base model's own
  uncertainty on the prompt: the entropy of its next-token distribution at the start of its answer,
  divided by log(vocabulary) so it lies in [0, 1]. The base answers well only when the prompt is
  none of the missing tasks *and* the base is sure of how to start.

Escalate when risk >= threshold. The threshold is set by hand or calibrated for a target
escalation rate the way RouteLLM's `calibrate_threshold` does: the (1 - rate) quantile of the risk
over held-out prompts that look like the traffic, so that share of them would have gone upstream.
Both terms are probabilities, so a hand-set 0.5 means "escalate when the local answer is more
likely poor than good".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from loraswitch.padding import left_pad
from loraswitch.routing.base import NONE_CLASS, Decision
from loraswitch.routing.features import prompt_features
from loraswitch.routing.seq import SequenceRouter

DEFAULT_THRESHOLD = 0.5
NEVER = 1.01  # a threshold no risk (a probability) reaches
MAX_CONTEXT = 512  # the base's uncertainty reads at most the prompt's last this many tokens


@dataclass
class Verdict:
    """One request's three-way decision and why."""

    target: str  # "adapter" | "base" | "upstream"
    risk: float  # estimated probability that the local answer is poor
    threshold: float
    local: str  # "adapter" | "base": what answers if it stays (or falls back) here
    adapter: str | None  # the router's choice when local == "adapter"
    confidence: float  # the router's calibrated confidence in its decision
    p_missing: float  # the router's probability for tasks whose adapter is not loaded here
    base_uncertainty: float | None  # u, computed only when the router abstains
    reason: str

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _sequence_router(router) -> SequenceRouter | None:
    inner = getattr(router, "inner", router)
    return inner if isinstance(inner, SequenceRouter) else None


def router_view(switch, texts: list[str], route: str | None) -> list[tuple[Decision, float]]:
    """(decision, p_missing) per text from the request's router, in one feature pass. A router
    that is not the trained selector knows no tasks beyond the loaded adapters: p_missing 0."""
    router = switch.router(route or "auto")
    seq = _sequence_router(router)
    if seq is None:
        return [(d, 0.0) for d in router.route(switch.engine, texts)]
    feats = prompt_features(switch.engine, texts, seq.layer)
    probs = torch.softmax(seq.logits(feats) / seq.temperature, -1)
    missing = [i for i, c in enumerate(seq.classes) if c != NONE_CLASS and c not in switch.engine.adapters]
    p_missing = probs[:, missing].sum(-1).tolist() if missing else [0.0] * len(texts)
    return list(zip(seq.route_features(switch.engine, feats), p_missing))


@torch.inference_mode()
def base_uncertainty(engine, prompts: list[list[int]], batch_size: int = 16) -> list[float]:
    """Normalized entropy in [0, 1] of the base model's first answer token, per prompt (token ids
    in the chat template, as the base would answer them)."""
    tok = engine.base.tokenizer
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        rows = [list(p[-MAX_CONTEXT:]) or [tok.eos_token_id] for p in prompts[i : i + batch_size]]
        padded = left_pad(rows, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        logits = engine.logits(padded.input_ids, padded.attention_mask)[:, -1].float()
        logp = torch.log_softmax(logits, -1)
        entropy = -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])
        out += entropy.clamp(0, 1).tolist()
    return out


def assess(switch, texts: list[str], prompt_ids: list[list[int]], route: str | None, threshold: float) -> list[Verdict]:
    """The verdict for each request (`texts`: what its router reads; `prompt_ids`: its prompt as
    the base would answer it)."""
    view = router_view(switch, texts, route)
    abstained = [i for i, (d, _) in enumerate(view) if d.adapter is None]
    u = dict(zip(abstained, base_uncertainty(switch.engine, [prompt_ids[i] for i in abstained]))) if abstained else {}
    verdicts = []
    for i, (decision, p_missing) in enumerate(view):
        if decision.adapter is not None:
            risk = 1.0 - decision.confidence
            local, why = "adapter", f"router chose {decision.adapter!r} with confidence {decision.confidence:.2f}"
        else:
            risk = 1.0 - (1.0 - p_missing) * (1.0 - u[i])
            local = "base"
            why = (f"router abstained ({decision.reason or 'no adapter fits'}); p={p_missing:.2f} that the task's "
                   f"adapter is not held here, base uncertainty {u[i]:.2f}")
        up = risk >= threshold
        why += f"; risk {risk:.2f} {'>=' if up else '<'} threshold {threshold:.2f}"
        verdicts.append(Verdict("upstream" if up else local, risk, threshold, local, decision.adapter,
                                decision.confidence, p_missing, u.get(i), why))
    return verdicts


def risks(switch, prompts: list[str], route: str | None = None, batch_size: int = 32) -> list[float]:
    """The risk of each single-turn user prompt (as `assess` scores it), for calibration."""
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        ids = [switch.base.chat_ids(p) for p in chunk]
        out += [v.risk for v in assess(switch, chunk, ids, route, NEVER)]
    return out


def threshold_for_rate(scores: list[float], rate: float) -> float:
    """RouteLLM's `calibrate_threshold`: the (1 - rate) quantile of the calibration scores, so
    that `rate` of them are at or above it (rate 0: nothing escalates)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"an escalation rate is a fraction in [0, 1], not {rate}")
    if not scores:
        raise ValueError("calibrating an escalation rate needs at least one calibration prompt")
    if rate == 0.0:
        return NEVER
    return float(torch.quantile(torch.tensor(scores, dtype=torch.float64), 1.0 - rate))
