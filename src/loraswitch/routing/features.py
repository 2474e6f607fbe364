"""Prompt features for sequence-level routing: the base model's hidden states part-way up.

The prompt, in the model's chat template exactly as it will be answered, goes through the first
`layer` decoder layers of the base model with every adapter off; a forward hook stops the pass
there, so routing costs a fraction of a prefill. The feature is the masked mean of that layer's
hidden states concatenated with the last token's (the start of the assistant's turn: the model's
state just before it answers).

Why the chat template: on raw text, a selector trained on five instruction wordings per task
learned the wordings: on two held-out wordings per task it routed 65-69% right. In the chat
template the same classifier routes 100% of them right at every layer we tried (8, 15, 22, 29 of
30), because the representation at the assistant's turn encodes what kind of answer comes next,
not how the request was phrased. `FEATURES` names this recipe; a router saved with another one
is refused as stale.

Every prompt routed this way opens with the same tokens: the chat template's system prompt and
the user turn's header (24 of the ~42 tokens of a short demo request). Their keys and values at
each layer depend on those tokens alone (the model is causal and adapters are off), so they are
computed once per model (`_Prefix`) and every batch runs only what follows them, right-padded
after the shared part; the mean adds the prefix's hidden states once. Same features up to float
rounding, at about half the cost for a short request, and a quarter for the short units
segmentation scores (issue 17: this pass ran before every `auto` prefill, at ~0.5x its cost).
Rows that do not start with the prefix (a clipped prompt) take the plain left-padded pass.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from loraswitch.engine import Engine
from loraswitch.padding import left_pad

FEATURES = "chat-mean-last"  # recorded in a trained router; change it whenever the recipe changes
MAX_TOKENS = 256  # longer prompts keep their first and last MAX_TOKENS // 2 tokens


class _Stop(Exception):
    pass


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no .model.layers; routing features need a decoder stack")
    return layers


def default_layer(engine: Engine) -> int:
    return len(decoder_layers(engine.model)) // 2


def _clip(ids: list[int]) -> list[int]:
    half = MAX_TOKENS // 2
    return ids if len(ids) <= MAX_TOKENS else ids[:half] + ids[-half:]


@dataclass
class _Prefix:
    """The shared opening tokens of every templated prompt, run once through layers 0..`layer`
    with adapters off: their keys and values per layer and their hidden states' sum at `layer`."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    hidden_sum: torch.Tensor  # [hidden], float32


# model -> {(layer, ids): _Prefix}; a base model's weights never change while it routes (merging
# exports restore them), and the entries go with the model
_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OPENINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its template's opening


def _template_prefix(engine: Engine) -> list[int]:
    """The tokens every user prompt's template starts with (two unlike prompts' common start),
    found once per tokenizer (templating costs about a millisecond a prompt)."""
    tok = engine.base.tokenizer
    with contextlib.suppress(KeyError, TypeError):
        return _OPENINGS[tok]
    a, b = engine.base.chat_ids("0"), engine.base.chat_ids("x y")
    n = 0
    while n < min(len(a), len(b)) - 1 and a[n] == b[n]:
        n += 1
    with contextlib.suppress(TypeError):  # a tokenizer that takes no weak reference: found every time
        _OPENINGS[tok] = a[:n]
    return a[:n]


def _run(engine: Engine, target: torch.nn.Module, **inputs) -> torch.Tensor:
    """The output of decoder layer `target` for `inputs`; the pass stops there."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    handle = target.register_forward_hook(hook)
    try:
        with engine.routed(None), contextlib.suppress(_Stop):
            engine.model(**{k: v.to(engine.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)},
                         **{k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)})
    finally:
        handle.remove()
    return captured[0]


def _prefix(engine: Engine, layer: int) -> _Prefix | None:
    ids = _template_prefix(engine)
    if len(ids) < 2:
        return None
    per_model = _PREFIXES.setdefault(engine.model, {})
    key = (layer, tuple(ids))
    if key not in per_model:
        cache = DynamicCache()
        h = _run(engine, decoder_layers(engine.model)[layer], input_ids=torch.tensor([ids]),
                 position_ids=torch.arange(len(ids))[None], past_key_values=cache, use_cache=True)
        kv = [(cache.layers[i].keys, cache.layers[i].values) for i in range(layer + 1)]
        per_model[key] = _Prefix(ids, kv, h[0].float().sum(0).cpu())
    return per_model[key]


def _shared_features(engine: Engine, pre: _Prefix, layer: int, rows: list[list[int]]) -> torch.Tensor:
    """Features of `rows` (each starts with `pre.ids`, and has more): their tails right-padded
    after the cached prefix."""
    p, tok = len(pre.ids), engine.base.tokenizer
    tails = [r[p:] for r in rows]
    width = max(len(t) for t in tails)
    ids = torch.full((len(rows), width), int(tok.pad_token_id or 0), dtype=torch.long)
    mask = torch.zeros((len(rows), p + width), dtype=torch.long)
    mask[:, :p] = 1
    for i, t in enumerate(tails):
        ids[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        mask[i, p : p + len(t)] = 1
    n = len(rows)
    cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in pre.kv])
    h = _run(engine, decoder_layers(engine.model)[layer], input_ids=ids, attention_mask=mask,
             position_ids=(p + torch.arange(width))[None].expand(n, -1), past_key_values=cache,
             use_cache=True).float().cpu()
    m = mask[:, p:].unsqueeze(-1).to(h.dtype)
    lengths = mask[:, p:].sum(1)
    mean = (pre.hidden_sum + (h * m).sum(1)) / (p + lengths).unsqueeze(-1).to(h.dtype)
    last = h[torch.arange(n), lengths - 1]
    return torch.cat([mean, last], dim=-1)


def _padded_features(engine: Engine, layer: int, rows: list[list[int]]) -> torch.Tensor:
    """Features of `rows` in one left-padded pass from the first token."""
    padded = left_pad(rows, engine.base.tokenizer.pad_token_id)
    h = _run(engine, decoder_layers(engine.model)[layer], **padded.model_inputs(), use_cache=False)
    h = h.float().cpu()  # the heads that read features are small and live on the CPU
    m = padded.attention_mask.unsqueeze(-1).to(h.dtype)
    mean = (h * m).sum(1) / m.sum(1)
    return torch.cat([mean, h[:, -1]], dim=-1)


@torch.inference_mode()
def prompt_features(engine: Engine, prompts: list[str], layer: int, batch_size: int = 32, progress: bool = False,
                    shared_prefix: bool = True) -> torch.Tensor:
    """[N, 2*hidden] features of `prompts` from decoder layer `layer` (0-based, its output).
    `shared_prefix`: run the template's common opening once (the module doc); False: every
    prompt from its first token (the reference the shared path is tested against)."""
    tok = engine.base.tokenizer
    pre = _prefix(engine, layer) if shared_prefix else None
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="features", disable=not progress):
        enc = [_clip(engine.base.chat_ids(p)) or [tok.eos_token_id] for p in prompts[i : i + batch_size]]
        feats = torch.empty(len(enc), 2 * engine.model.config.hidden_size)
        shared = [j for j, r in enumerate(enc) if pre is not None and len(r) > len(pre.ids)
                  and r[: len(pre.ids)] == pre.ids]
        plain = sorted(set(range(len(enc))) - set(shared))
        if shared:
            feats[shared] = _shared_features(engine, pre, layer, [enc[j] for j in shared])
        if plain:
            feats[plain] = _padded_features(engine, layer, [enc[j] for j in plain])
        out.append(feats)
    return torch.cat(out)
