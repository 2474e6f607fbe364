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
computed once per model (`_Prefix`) and every batch runs only what follows them; the mean adds
the prefix's hidden states once. Same features up to float rounding, at about half the cost for a
short request, and a quarter for the short units segmentation scores (issue 17: this pass ran
before every `auto` prefill, at ~0.5x its cost). Rows that do not start with the prefix (a
clipped prompt) take the plain left-padded pass.

The rows after the prefix are packed into sequences of a few rows each (`_pack`), each row
reading the prefix and its own tokens only (`_shared_features`: a block-diagonal causal
mask), not padded to the longest: a pass costs a fixed part (every layer's weights read once)
plus its tokens, and padding a 40-token review next to 12-token requests made every row cost
40 (sorting rows by length into several passes paid the fixed part again instead). One
pass can read several layers (`layer_features`): the selector's fast head and its main head are
trained on one pass over the training prompts. A text asked twice is computed twice, as the
prefill computes it (`auto_cost.py` at 32 requests asks 8 prompts 4 times each: computing each
once would flatter `auto`), so `read_ahead` hands each feature it keeps out once.

`read_ahead` keeps features only inside `reading_ahead()`, the scope of one batch's
segmentation and routing (`switch.run`): a context variable, so threads and nested batches (a
running batch taking arrivals in) each see their own, and nothing outlives the batch.

A pass that reads a text to a higher layer than one before it in the same scope resumes from
where that one stopped (`resuming`): the selector's fast head reads layer 5, and the prompts it
sends to no adapter (or, once the library has grown, is unsure of) are read at 15 by running
layers 6-15 over the kept layer-5 hidden states, not 0-15 again; segmentation's main-head
scoring of the units its screen read resumes the same way. Same features up to float rounding;
every asked row still runs every layer it needs once, so repeated prompts cost what they did.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
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


def _run_from(engine: Engine, start: int, layers: tuple[int, ...], hidden: torch.Tensor,
              **inputs) -> dict[int, torch.Tensor]:
    """The outputs of decoder layers `layers` for `hidden`, the output of layer `start`: the
    layers above it called one by one as the model's own forward calls them (Llama-family
    decoders, `_resumable`), with `inputs`' 4D mask, positions and cache."""
    stack, inner = decoder_layers(engine.model), getattr(engine.model, "model", engine.model)
    inputs = {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    if "cache" in inspect.signature(stack[start + 1].forward).parameters:  # its name from transformers 5.2x
        inputs["cache"] = inputs.pop("past_key_values")
    rotary = inner.rotary_emb(hidden, position_ids=inputs["position_ids"])
    captured = {}
    with engine.routed(None):
        for i in range(start + 1, max(layers) + 1):
            out = stack[i](hidden, position_embeddings=rotary, use_cache=True, **inputs)
            hidden = out[0] if isinstance(out, tuple) else out
            if i in layers:
                captured[i] = hidden
    return captured


def _resumable(engine: Engine) -> bool:
    """Whether a pass can start above layer 0 (`_run_from`): the decoder keeps its rotary
    embedding beside the layers, as the Llama family does; other models read from the start."""
    return hasattr(getattr(engine.model, "model", engine.model), "rotary_emb")


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


def _shared_features(engine: Engine, pre: _Prefix, layers: tuple[int, ...], tails: list, batch_size: int,
                     progress: bool = False, start: int | None = None, tops: list | None = None,
                     ) -> dict[int, torch.Tensor]:
    """Features at each of `layers` of rows that start with `pre.ids` and have more: `tails`,
    what follows the prefix, are token ids, or with `start` the hidden states layer `start`
    output for them (a resumed pass, `_run_from`). The tails are packed into sequences
    (`_pack`), each reading the prefix and its own positions only; a pass holds at most as many
    tokens as `batch_size` rows padded to the longest did (a sequence up to four rows long costs
    attention memory by its square). `tops`, when given, receives each row's hidden states at
    the highest layer (what a later pass resumes from)."""
    p, dtype = len(pre.ids), engine.model.dtype
    width, bins = _pack([len(t) for t in tails])
    per_pass = max(1, batch_size * max(len(t) for t in tails) // width)
    feats = {layer: torch.empty(len(tails), 2 * engine.model.config.hidden_size) for layer in layers}
    for first in tqdm(range(0, len(bins), per_pass), desc="features", disable=not progress):
        chunk = bins[first : first + per_pass]
        if start is None:
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
        else:
            ids = torch.zeros((len(chunk), width, engine.model.config.hidden_size), dtype=dtype, device=engine.device)
        row = torch.full((len(chunk), width), -1)  # which row each position holds (-1: padding)
        pos = torch.zeros((len(chunk), width), dtype=torch.long)  # its position after the prefix
        spans = []  # (row, bin, start, length)
        for b, members in enumerate(chunk):
            at = 0
            for j in members:
                n = len(tails[j])
                ids[b, at : at + n] = torch.as_tensor(tails[j], dtype=ids.dtype, device=ids.device)
                row[b, at : at + n], pos[b, at : at + n] = j, torch.arange(n)
                spans.append((j, b, at, n))
                at += n
        sees = (row[:, :, None] == row[:, None, :]) & (row[:, None, :] >= 0) & (pos[:, None, :] <= pos[:, :, None])
        sees = torch.cat([torch.ones(len(chunk), width, p, dtype=torch.bool), sees], dim=-1)
        mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]
        n = len(chunk)
        cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in pre.kv])
        if start is None:
            out = _run(engine, layers, input_ids=ids, attention_mask=mask, position_ids=p + pos,
                       past_key_values=cache, use_cache=True)
        else:
            out = _run_from(engine, start, layers, ids, attention_mask=mask, position_ids=p + pos,
                            past_key_values=cache)
        for layer in layers:
            h = out[layer].float().cpu()
            for j, b, at, n in spans:
                mine = h[b, at : at + n]
                mean = (pre.hidden_sum[layer] + mine.sum(0)) / (p + n)
                feats[layer][j] = torch.cat([mean, mine[-1]])
        if tops is not None:
            for j, b, at, n in spans:
                tops[j] = out[max(layers)][b, at : at + n].clone()
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


def _bins(lengths: list[int], width: int) -> list[list[int]]:
    """Rows (indices into `lengths`) packed into bins of `width` tokens, first fit by decreasing
    length."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((b for b, r in enumerate(room) if lengths[i] <= r), None)
        if fit is None:
            bins.append([])
            room.append(width)
            fit = len(bins) - 1
        bins[fit].append(i)
        room[fit] -= lengths[i]
    return bins


def _pack(lengths: list[int]) -> tuple[int, list[list[int]]]:
    """(width, bins): the bins of the width, from the longest row to four times it, that leave
    the fewest padded tokens. Every pass reads each layer's weights once whatever its rows (on
    this CPU, one thread: a pass to layer 5 costs 22 ms + 0.35 ms a token, to layer 15 57 ms +
    0.96 ms), so short rows should share one pass without paying for the longest one's padding:
    padded to the longest, 8 demo prompts and 5 segmentation units were 40% padding."""
    longest = max(lengths)
    widths = sorted({int(longest * f) for f in (1, 1.25, 1.5, 2, 3, 4)})
    packs = [(w, _bins(lengths, w)) for w in widths]
    return min(packs, key=lambda wb: len(wb[1]) * wb[0])


@torch.inference_mode()
def layer_features(engine: Engine, prompts: list[str], layers: list[int], batch_size: int = 32,
                   progress: bool = False, shared_prefix: bool = True) -> dict[int, torch.Tensor]:
    """{layer: [N, 2*hidden]} features of `prompts` at each decoder layer in `layers` (0-based,
    its output), in one pass up to the highest. `shared_prefix`: run the template's common
    opening once and pack the rest (the module doc), `batch_size` packed sequences a pass; False:
    every prompt from its first token, left-padded, `batch_size` rows a pass (the reference the
    shared path is tested against)."""
    tok, wanted = engine.base.tokenizer, tuple(sorted(set(layers)))
    pre = _prefix(engine, wanted) if shared_prefix else None
    enc = [_clip(engine.base.chat_ids(p)) or [tok.eos_token_id] for p in prompts]
    feats = {i: torch.empty(len(enc), 2 * engine.model.config.hidden_size) for i in wanted}
    p = len(pre.ids) if pre is not None else 0
    shared = [j for j, r in enumerate(enc) if pre is not None and len(r) > p and r[:p] == pre.ids]
    plain = sorted(set(range(len(enc))) - set(shared))
    states = _STATES.get() if shared_prefix else None
    key = lambda j: (id(engine.model), prompts[j])  # noqa: E731  (a row's entry in `states`)
    resumed: dict[int, list[int]] = {}  # layer resumed from -> rows
    if states is not None and _resumable(engine):
        for j in shared:
            state = states.get(key(j))
            if state is not None and state[0] < wanted[0] and len(state[1]) == len(enc[j]) - p:
                resumed.setdefault(state[0], []).append(j)
    fresh = sorted(set(shared) - {j for rows in resumed.values() for j in rows})
    for start, rows in [(None, fresh)] + sorted(resumed.items()):
        if not rows:
            continue
        tails = [enc[j][p:] for j in rows] if start is None else [states[key(j)][1] for j in rows]
        tops: list | None = [None] * len(rows) if states is not None else None
        got = _shared_features(engine, pre, wanted, tails, batch_size, progress, start, tops)
        for i in wanted:
            feats[i][rows] = got[i]
        for j, top in zip(rows, tops or []):
            states[key(j)] = (wanted[-1], top)
    for k in tqdm(range(0, len(plain), batch_size), desc="features", disable=not progress or not plain):
        rows = plain[k : k + batch_size]
        got = _padded_features(engine, wanted, [enc[j] for j in rows])
        for i in wanted:
            feats[i][rows] = got[i]
    return feats


def prompt_features(engine: Engine, prompts: list[str], layer: int, batch_size: int = 32, progress: bool = False,
                    shared_prefix: bool = True) -> torch.Tensor:
    """[N, 2*hidden] features of `prompts` from decoder layer `layer` (`layer_features`); those a
    `read_ahead` kept are handed out instead of computed again."""
    kept = (_AHEAD.get() or {}) if shared_prefix else {}
    key = id(engine.model), layer
    out = [kept[(*key, p)].pop() if kept.get((*key, p)) else None for p in prompts]
    rest = [i for i, f in enumerate(out) if f is None]
    if len(rest) == len(prompts):
        return layer_features(engine, prompts, [layer], batch_size, progress, shared_prefix)[layer]
    if rest:
        for i, f in zip(rest, layer_features(engine, [prompts[i] for i in rest], [layer], batch_size, progress)[layer]):
            out[i] = f
    return torch.stack(out)


# {(id of the model, layer, text): [features]}: what `read_ahead` computed for a later call,
# inside the current `reading_ahead` scope (None outside one)
_AHEAD: ContextVar[dict[tuple[int, int, str], list[torch.Tensor]] | None] = ContextVar("loraswitch_ahead", default=None)


# {(id of the model, text): (layer, [tokens after the prefix, hidden])}: how far a pass inside the
# current `resuming` scope read each text, and the hidden states it stopped at (None outside one)
_STATES: ContextVar[dict[tuple[int, str], tuple[int, torch.Tensor]] | None] = ContextVar("loraswitch_states",
                                                                                          default=None)


@contextlib.contextmanager
def reading_ahead() -> Iterator[None]:
    """The scope of one batch's segmentation and routing, inside which `read_ahead` keeps the
    features it computes for later and passes resume (the module doc); all is dropped when it
    ends."""
    token, states = _AHEAD.set({}), _STATES.set({})
    try:
        yield
    finally:
        _AHEAD.reset(token)
        _STATES.reset(states)


@contextlib.contextmanager
def resuming() -> Iterator[None]:
    """A scope inside which a pass reading a text higher than an earlier one resumes from where
    that one stopped (the module doc): the enclosing one's, where there is one (a batch's
    `reading_ahead`), else a new one that ends with it."""
    if _STATES.get() is not None:
        yield
        return
    token = _STATES.set({})
    try:
        yield
    finally:
        _STATES.reset(token)


def read_ahead(engine: Engine, texts: list[str], layer: int, later: list[str]) -> torch.Tensor:
    """Features of `texts` at `layer`, computed in one pass with those of `later`, which are kept
    for the `prompt_features` call that asks for them next: segmentation's screen reads a batch's
    units with the selector's fast head right before the selector reads its whole prompts at the
    same layer (`switch.screen`), and one pass costs less than two (`_pack`). The features of
    `texts` are kept too: segmentation asks for some of its units at that layer again (the fast
    head's picks, `segment._fast_picks`). Each kept feature is handed out once and the next
    read-ahead drops what was not, so a text is still computed once per time it is asked (the
    module doc); outside `reading_ahead` nothing is kept and `later` is not read."""
    kept = _AHEAD.get()
    if kept is None:
        return prompt_features(engine, texts, layer)
    kept.clear()
    feats = prompt_features(engine, texts + later, layer)
    for t, f in zip(texts + later, feats):
        kept.setdefault((id(engine.model), layer, t), []).append(f)
    return feats[: len(texts)]


def precomputed(texts: list[str], feats: dict[int, torch.Tensor]) -> Callable[[object, list[str], int], torch.Tensor]:
    """A `read(engine, texts, layer)` for `SequenceRouter.cascade` that looks features up instead
    of computing them: `feats[layer]` holds the rows of `texts` (benchmarks that fit many
    routers on features read once route through the same cascade as `auto`)."""
    row = {t: i for i, t in enumerate(texts)}

    def read(engine, asked: list[str], layer: int) -> torch.Tensor:
        return feats[layer][[row[t] for t in asked]]
    return read
