"""Token-level learned gates (after MeteoRA): one small linear gate per targeted layer scores the
adapters, plus "no adapter", from that layer's input; each token uses the top-k.

Training keeps the base model and every adapter frozen and runs in two phases:
1. per-token task labels: every gate learns, from its own layer's inputs, to name each token's
   task (the shared chat preamble is labelled "no adapter"), while the model applies an adapter
   drawn at random per example (`train_gates(teacher=...)` says why not the right one);
2. LM loss (top_k > 1 only): a few steps of next-token loss on the answers through the gated
   model, so the gates learn the mixtures that actually answer well (gradients reach the gates
   through the routing weights; the kernels are autograd-safe).
Gates are saved as safetensors together with the library's adapter names, order and weight
fingerprints; loading them against any other library raises instead of misrouting.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loraswitch.engine import Engine
from loraswitch.kernels import Routing
from loraswitch.padding import left_pad, tail_targets
from loraswitch.routing.base import NONE_CLASS, check_library, library_signature, load_router_file, save_router_file
from loraswitch.routing.segments import SegmentPolicy
from loraswitch.routing.token import PAGED_OUT, TokenPolicy, TokenRouter

FILE = "gate_router.safetensors"


MODES = ("segment", "token")


class GateRouter(TokenRouter):
    """`mode` "segment" (default): the gates read the prompt and plan one adapter per answer part,
    held across all layers (`routing.segments`), and with `cues` a multi-part plan is answered
    part after part in the one pass (`routing.cues`); "token": every layer routes every token itself,
    top-k (MeteoRA's recipe is top_k=2 with a temperature)."""

    name = "gate"

    def __init__(self, engine: Engine, gates: dict[str, torch.Tensor], names: list[str], top_k: int = 1, temperature: float = 1.0,
                 mode: str = "segment", reads: str = "routed", cues: bool = True):
        super().__init__(engine, top_k, temperature)
        # the inputs the gates were fitted to: "routed" (teacher-forced, the default) or "base"
        # (`train_gates(teacher="base")`: the base model's, so they read with no adapter applied)
        self.reads = reads
        if mode not in MODES:
            raise ValueError(f"gate mode {mode!r}: choose one of {', '.join(MODES)}")
        self.gates = gates  # key -> [len(names) + 1, in]; row 0 = no adapter
        self.names = names
        self.mode = mode
        self.cues = cues  # segment mode: each part of a multi-part plan gets its cue (`routing.cues`)
        self._slots: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def slots(self) -> torch.Tensor:
        """Slot ids of the gate's columns (no adapter, then `names`); an adapter that is not in
        the layers now (paged out, or removed) is `PAGED_OUT`, which `select` leaves out."""
        key = self.engine.layout
        if self._slots is None or self._slots[0] != key:
            ids = [-1] + [self.engine.slots.get(n, PAGED_OUT) for n in self.names]
            self._slots = (key, torch.tensor(ids, dtype=torch.long))
        return self._slots[1]

    def scores(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        gate = self.gates.get(key)
        if gate is None:
            return None
        if gate.device != x.device and not gate.requires_grad:  # loaded on the CPU, run on a GPU: moved once
            gate = self.gates[key] = gate.to(x.device)
        return x.reshape(-1, x.shape[-1]).to(gate.dtype) @ gate.T, self.slots

    def policy(self, engine: Engine, prompts: list[str], allowed: frozenset[str] | None = None) -> TokenPolicy:
        if self.mode == "token":
            return TokenPolicy(self, engine, allowed)
        return SegmentPolicy(self, engine, prompts, allowed, cues=self.cues)

    def variant(self, **changes) -> GateRouter:
        """The same gates read another way (mode, top_k, temperature): MeteoRA's recipe beside ours."""
        kw = {"top_k": self.top_k, "temperature": self.temperature, "mode": self.mode, "reads": self.reads,
              "cues": self.cues} | changes
        return GateRouter(self.engine, self.gates, self.names, **kw)

    def save(self, directory: str | Path) -> Path:
        meta = {"names": self.names, "top_k": self.top_k, "temperature": self.temperature, "reads": self.reads,
                "library": library_signature(self.engine)}
        return save_router_file(Path(directory) / FILE, self.gates, meta)

    @classmethod
    def load(cls, directory: str | Path, engine: Engine) -> GateRouter:
        path = Path(directory) / FILE
        gates, meta = load_router_file(path, "train them with `loraswitch train-router --router gate`")
        check_library(engine, meta["library"], "the gate router")
        if not set(meta["names"]) <= {i["name"] for i in meta["library"]}:
            raise ValueError(f"{path}: gate classes name adapters outside the recorded library")
        missing = set(gates) - set(engine.layers)
        if missing:
            raise ValueError(f"{path}: gates for layers no loaded adapter targets: {sorted(missing)[:3]}")
        return cls(engine, gates, meta["names"], meta["top_k"], meta["temperature"], reads=meta.get("reads", "routed"))


LM_MICRO_BATCH = 2  # rows per forward/backward in the LM-loss phase (gradients accumulated over the batch)


def _encode(engine: Engine, prompt: str, answer: str | None) -> tuple[list[int], int, int]:
    """Chat ids (+ answer and end of turn), the index where the user's words start (tokens before
    it are the shared chat preamble, labelled "no adapter"), and the answer length."""
    base = engine.base
    ids, n_ans = base.encode_example(prompt, answer) if answer is not None else (base.chat_ids(prompt), 0)
    return ids, base.user_start, n_ans


TEACHERS = ("random", "label", "base")


def train_gates(engine: Engine, data: dict[str, list[tuple[str, str | None]]], epochs: int = 3, lm_steps: int = 20,
                batch_size: int = 8, lr: float = 5e-3, top_k: int = 1, seed: int = 0, progress: bool = True,
                teacher: str = "random") -> GateRouter:
    """Train gates for every wrapped layer from {adapter or NONE_CLASS: [(prompt, answer)]}.

    `teacher` is what the model applies while the gates learn the labels (phase 1): "random", one
    adapter (or none) drawn per example regardless of its label; "label", the example's own adapter
    (teacher forcing, the first recipe); "base", no adapter (the gates then read a plain base
    forward, `reads`). Why "random" is the default: gates taught under the label's own adapter
    learned to name the adapter being applied, not the task: an English prompt run under
    `num_to_french` was read as French by 82% of the layers, so whichever adapter the early layers
    picked, the later ones voted for it (`num_to_english` 0 of 20 on the demo's validation prompts)."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher {teacher!r}: choose one of {', '.join(TEACHERS)}")
    names = [n for n in engine.names if n in data]
    label_of = {n: i + 1 for i, n in enumerate(names)} | {NONE_CLASS: 0}
    rows = [(_encode(engine, p, a), label_of[k]) for k, pairs in data.items() if k in label_of for p, a in pairs]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    gates = {key: torch.zeros(len(names) + 1, layer.in_features, requires_grad=True) for key, layer in engine.layers.items()}
    router = GateRouter(engine, gates, names, top_k=top_k, reads="base" if teacher == "base" else "routed")
    _fit_labels(engine, router, rows, epochs, batch_size, lr, rng, teacher, progress)
    if top_k > 1:  # one gate pick per token has weight 1 whatever its score: no gradient would reach the gates
        _fit_answers(engine, router, rows, lm_steps, batch_size, lr / 5, rng, progress)
    for g in gates.values():
        g.requires_grad_(False)
    return router


def _pack(router: GateRouter, batch: list, rng: random.Random | None = None, teacher: str = "label"):
    """A batch left-padded: (inputs, each token's label (0: no adapter, also on padding and the
    chat preamble), each token's teacher slot)."""
    padded = left_pad([r[0][0] for r in batch], router.engine.base.tokenizer.pad_token_id)
    width = padded.width
    labels = torch.zeros_like(padded.input_ids)
    slots = torch.full((len(batch), width), -1, dtype=torch.long)
    for j, ((seq, user_start, _), label) in enumerate(batch):
        off = width - len(seq)
        labels[j, off + user_start :] = label
        taught = rng.randrange(len(router.names) + 1) if teacher == "random" and rng is not None else label
        slots[j, off:] = router.slots[taught]
    return padded, labels.reshape(-1), slots.reshape(-1)


def _fit_labels(engine: Engine, router: GateRouter, rows: list, epochs: int, batch_size: int, lr: float,
                rng: random.Random, teacher: str, progress: bool) -> None:
    """Phase 1: every gate learns each token's label from its own layer's inputs, one Adam step
    per batch on all gates (the model runs without grad; each gate's graph is tiny)."""
    gates = router.gates
    opt = torch.optim.Adam(list(gates.values()), lr=lr)
    n_batches = (len(rows) + batch_size - 1) // batch_size
    bar = tqdm(total=epochs * n_batches, desc="train gates (labels)", disable=not progress)
    for _ in range(epochs):
        order = rows[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            padded, labels, slots = _pack(router, order[i : i + batch_size], rng, teacher)
            keep = padded.attention_mask.reshape(-1).bool()
            losses: list[torch.Tensor] = []
            taught = None if teacher == "base" else Routing(slots[:, None], torch.ones(len(slots), 1))

            def record(key: str, x: torch.Tensor, _keep=keep, _labels=labels, _losses=losses, _taught=taught) -> Routing | None:
                with torch.enable_grad():
                    logits = x.detach().reshape(-1, x.shape[-1])[_keep] @ gates[key].T
                    _losses.append(torch.nn.functional.cross_entropy(logits, _labels[_keep]))
                return _taught

            with torch.no_grad(), engine.routed(None, record):
                engine.model(**padded.model_inputs(), use_cache=False, logits_to_keep=1)
            loss = torch.stack(losses).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()


def _fit_answers(engine: Engine, router: GateRouter, rows: list, steps: int, batch_size: int, lr: float,
                 rng: random.Random, progress: bool) -> None:
    """Phase 2: next-token loss on the answers through the gated model (base and adapters frozen;
    gradients reach the gates through the routing weights)."""
    answered = [r for r in rows if r[0][2] > 0]
    opt = torch.optim.Adam(list(router.gates.values()), lr=lr)
    for _ in tqdm(range(steps if answered else 0), desc="train gates (LM loss)", disable=not progress):
        batch = rng.sample(answered, min(batch_size, len(answered)))
        total = sum(r[0][2] for r in batch)  # answer tokens of the whole batch: the loss is their mean
        opt.zero_grad()
        # micro-batches, gradients accumulated: backward through the whole model keeps every
        # layer's activations, and 8 long BIG-bench prompts at once took 24 GB (killed)
        for k in range(0, len(batch), LM_MICRO_BATCH):
            chunk = batch[k : k + LM_MICRO_BATCH]
            padded, _, _ = _pack(router, chunk)
            target = tail_targets([r[0][0] for r in chunk], [r[0][2] for r in chunk])
            with torch.enable_grad(), engine.routed(None, router.select):
                out = engine.model(**padded.model_inputs(), use_cache=False, logits_to_keep=target.shape[1] + 1)
                logits = out.logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                         reduction="sum") / total
                loss.backward()
        opt.step()
