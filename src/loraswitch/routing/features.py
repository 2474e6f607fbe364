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

Rows are batched by length (`_groups`): right-padding a 40-token review next to 12-token requests
makes every row cost 40, and the pass is arithmetic per padded token, so sorted rows are cut into
batches where the padding saved outweighs one more pass's fixed cost. One pass can read several
layers (`layer_features`): the selector's fast head and its main head are trained on one pass
over the training prompts. A text asked twice in one call is computed twice, as the prefill
computes it: `benchmarks/auto_cost.py` at 32 requests asks each of 8 prompts 4 times, and
computing each once would make `auto` look cheaper there than on traffic that does not repeat.
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
    """The main selector's layer: the middle of the stack (15 of SmolLM2's 30)."""
    return len(decoder_layers(engine.model)) // 2


def fast_layer(engine: Engine) -> int:
    """The fast head's layer (`routing.seq`): the output of the first sixth of the stack (5 of
    30), a third of the middle layer's pass. On both embedded libraries the selector routes every
    held-out prompt and wording right from layer 4 up and misroutes below (docs/routing.md)."""
    return len(decoder_layers(engine.model)) // 6


def _clip(ids: list[int]) -> list[int]:
    half = MAX_TOKENS // 2
    return ids if len(ids) <= MAX_TOKENS else ids[:half] + ids[-half:]


@dataclass
class _Prefix:
    """The shared opening tokens of every templated prompt, run once through layers 0..`layer`
    with adapters off: their keys and values per layer and their hidden states' sum at `layer`."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    hidden_sum: dict[int, torch.Tensor]  # layer -> [hidden], float32


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


def _run(engine: Engine, layers: tuple[int, ...], **inputs) -> dict[int, torch.Tensor]:
    """The outputs of decoder layers `layers` for `inputs`; the pass stops at the last of them."""
    captured: dict[int, torch.Tensor] = {}
    stack = decoder_layers(engine.model)

    def hook(layer: int):
        def capture(_module, _inputs, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == max(layers):
                raise _Stop
        return capture

    handles = [stack[i].register_forward_hook(hook(i)) for i in set(layers)]
    try:
        with engine.routed(None), contextlib.suppress(_Stop):
            engine.model(**{k: v.to(engine.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)},
                         **{k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)})
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _prefix(engine: Engine, layers: tuple[int, ...]) -> _Prefix | None:
    ids = _template_prefix(engine)
    if len(ids) < 2:
        return None
    per_model = _PREFIXES.setdefault(engine.model, {})
    key = (layers, tuple(ids))
    if key not in per_model:
        cache = DynamicCache()
        h = _run(engine, layers, input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None],
                 past_key_values=cache, use_cache=True)
        kv = [(cache.layers[i].keys, cache.layers[i].values) for i in range(max(layers) + 1)]
        per_model[key] = _Prefix(ids, kv, {i: h[i][0].float().sum(0).cpu() for i in layers})
    return per_model[key]


def _shared_features(engine: Engine, pre: _Prefix, layers: tuple[int, ...],
                     rows: list[list[int]]) -> dict[int, torch.Tensor]:
    """Features of `rows` (each starts with `pre.ids`, and has more) at each of `layers`: their
    tails right-padded after the cached prefix."""
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
    out = _run(engine, layers, input_ids=ids, attention_mask=mask,
               position_ids=(p + torch.arange(width))[None].expand(n, -1), past_key_values=cache, use_cache=True)
    m = mask[:, p:].unsqueeze(-1).float()
    lengths = mask[:, p:].sum(1)
    feats = {}
    for layer in layers:
        h = out[layer].float().cpu()
        mean = (pre.hidden_sum[layer] + (h * m).sum(1)) / (p + lengths).unsqueeze(-1).float()
        feats[layer] = torch.cat([mean, h[torch.arange(n), lengths - 1]], dim=-1)
    return feats


def _padded_features(engine: Engine, layers: tuple[int, ...], rows: list[list[int]]) -> dict[int, torch.Tensor]:
    """Features of `rows` in one left-padded pass from the first token, at each of `layers`."""
    padded = left_pad(rows, engine.base.tokenizer.pad_token_id)
    out = _run(engine, layers, **padded.model_inputs(), use_cache=False)
    m = padded.attention_mask.unsqueeze(-1).float()
    feats = {}
    for layer in layers:
        h = out[layer].float().cpu()  # the heads that read features are small and live on the CPU
        feats[layer] = torch.cat([(h * m).sum(1) / m.sum(1), h[:, -1]], dim=-1)
    return feats


PASS_COST = 16  # a pass's fixed cost in padded tokens (Python per layer; about 16 on this CPU)


def _groups(lengths: list[int], max_rows: int, pass_cost: int = PASS_COST) -> list[tuple[int, int]]:
    """[start, end) batches of rows sorted by length (ascending) with the least padded tokens plus
    `pass_cost` per batch, at most `max_rows` rows each (a shortest-path over the cut points)."""
    n = len(lengths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + pass_cost + (end - start) * lengths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    out, end = [], n
    while end > 0:
        out.append((cut[end], end))
        end = cut[end]
    return out[::-1]


@torch.inference_mode()
def layer_features(engine: Engine, prompts: list[str], layers: list[int], batch_size: int = 32,
                   progress: bool = False, shared_prefix: bool = True) -> dict[int, torch.Tensor]:
    """{layer: [N, 2*hidden]} features of `prompts` at each decoder layer in `layers` (0-based,
    its output), in one pass up to the highest. `shared_prefix`: run the template's common
    opening once (the module doc); False: every prompt from its first token, in order (the
    reference the shared path is tested against)."""
    tok, wanted = engine.base.tokenizer, tuple(sorted(set(layers)))
    pre = _prefix(engine, wanted) if shared_prefix else None
    enc = [_clip(engine.base.chat_ids(p)) or [tok.eos_token_id] for p in prompts]
    feats = {i: torch.empty(len(enc), 2 * engine.model.config.hidden_size) for i in wanted}
    p = len(pre.ids) if pre is not None else 0
    shared = sorted((j for j, r in enumerate(enc) if pre is not None and len(r) > p and r[:p] == pre.ids),
                    key=lambda j: len(enc[j]))
    plain = sorted(set(range(len(enc))) - set(shared))
    batches = [(True, shared[a:b]) for a, b in _groups([len(enc[j]) - p for j in shared], batch_size)]
    batches += [(False, plain[i : i + batch_size]) for i in range(0, len(plain), batch_size)]
    for is_shared, rows in tqdm(batches, desc="features", disable=not progress):
        got = (_shared_features(engine, pre, wanted, [enc[j] for j in rows]) if is_shared
               else _padded_features(engine, wanted, [enc[j] for j in rows]))
        for i in wanted:
            feats[i][rows] = got[i]
    return feats


def prompt_features(engine: Engine, prompts: list[str], layer: int, batch_size: int = 32, progress: bool = False,
                    shared_prefix: bool = True) -> torch.Tensor:
    """[N, 2*hidden] features of `prompts` from decoder layer `layer` (`layer_features`)."""
    return layer_features(engine, prompts, [layer], batch_size, progress, shared_prefix)[layer]
