"""Token-level learned gates (after MeteoRA): one small linear gate per targeted layer scores the
adapters, plus "no adapter", from that layer's input; each token uses the top-k.

Training keeps the base model and every adapter frozen and runs in two phases:
1. per-token task labels: examples are run with the *correct* adapter routed (teacher forcing,
   so each layer sees the inputs it will see at inference) and every gate learns, from its own
   layer's inputs, to name that adapter; the shared chat preamble is labelled "no adapter";
2. LM loss: a few steps of next-token loss on the answers through the gated model, so the gates
   learn the mixtures that actually answer well (gradients reach the gates through the routing
   weights; the kernels are autograd-safe).
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
    held across all layers (`routing.segments`); "token": every layer routes every token itself,
    top-k (MeteoRA's recipe is top_k=2 with a temperature)."""

    name = "gate"

    def __init__(self, engine: Engine, gates: dict[str, torch.Tensor], names: list[str], top_k: int = 1, temperature: float = 1.0,
                 mode: str = "segment", reads: str = "routed"):
        super().__init__(engine, top_k, temperature)
        # the inputs the gates were fitted to: "routed" (teacher-forced, the default) or "base"
        # (`train_gates(teacher_forced=False)`: the base model's, so they read with no adapter applied)
        self.reads = reads
        if mode not in MODES:
            raise ValueError(f"gate mode {mode!r}: choose one of {', '.join(MODES)}")
        self.gates = gates  # key -> [len(names) + 1, in]; row 0 = no adapter
        self.names = names
        self.mode = mode
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
        return SegmentPolicy(self, engine, prompts, allowed)

    def variant(self, **changes) -> GateRouter:
        """The same gates read another way (mode, top_k, temperature): MeteoRA's recipe beside ours."""
        kw = {"top_k": self.top_k, "temperature": self.temperature, "mode": self.mode, "reads": self.reads} | changes
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


def train_gates(engine: Engine, data: dict[str, list[tuple[str, str | None]]], epochs: int = 3, lm_steps: int = 20,
                batch_size: int = 8, lr: float = 5e-3, top_k: int = 1, seed: int = 0, progress: bool = True,
                teacher_forced: bool = True) -> GateRouter:
    """Train gates for every wrapped layer from {adapter or NONE_CLASS: [(prompt, answer)]} (inputs: `reads`)."""
    names = [n for n in engine.names if n in data]
    label_of = {n: i + 1 for i, n in enumerate(names)} | {NONE_CLASS: 0}
    rows = [(_encode(engine, p, a), label_of[k]) for k, pairs in data.items() if k in label_of for p, a in pairs]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    gates = {key: torch.zeros(len(names) + 1, layer.in_features, requires_grad=True) for key, layer in engine.layers.items()}
    router = GateRouter(engine, gates, names, top_k=top_k, reads="routed" if teacher_forced else "base")
    opt = torch.optim.Adam(list(gates.values()), lr=lr)
    pad = engine.base.tokenizer.pad_token_id

    def batches():
        order = rows[:]
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            yield order[i : i + batch_size]

    def pack(batch):
        padded = left_pad([r[0][0] for r in batch], pad)
        width = padded.width
        labels = torch.zeros_like(padded.input_ids)  # per-token gate label: 0 (no adapter) on padding and preamble
        slots = torch.full((len(batch), width), -1, dtype=torch.long)
        for j, ((seq, user_start, _), label) in enumerate(batch):
            off = width - len(seq)
            labels[j, off + user_start :] = label
            slots[j, off:] = router.slots[label]  # teacher forcing: the correct adapter everywhere
        return padded, labels.reshape(-1), slots.reshape(-1)

    # phase 1: per-token labels, teacher-forced (or base) inputs, one Adam step per batch on every gate
    n_batches = (len(rows) + batch_size - 1) // batch_size
    bar = tqdm(total=epochs * n_batches, desc="train gates (labels)", disable=not progress)
    for _ in range(epochs):
        for batch in batches():
            padded, labels, slots = pack(batch)
            keep = padded.attention_mask.reshape(-1).bool()
            losses: list[torch.Tensor] = []
            teacher = Routing(slots[:, None], torch.ones(len(slots), 1))

            def record(key: str, x: torch.Tensor, _keep=keep, _labels=labels, _losses=losses, _teacher=teacher) -> Routing:
                with torch.enable_grad():  # the model runs without grad; each gate's own graph is tiny
                    logits = x.detach().reshape(-1, x.shape[-1])[_keep] @ gates[key].T
                    _losses.append(torch.nn.functional.cross_entropy(logits, _labels[_keep]))
                return _teacher if teacher_forced else None

            with torch.no_grad(), engine.routed(None, record):
                engine.model(**padded.model_inputs(), use_cache=False, logits_to_keep=1)
            loss = torch.stack(losses).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    # phase 2: next-token loss on the answers through the gated model (base and adapters frozen)
    answered = [r for r in rows if r[0][2] > 0]
    opt = torch.optim.Adam(list(gates.values()), lr=lr / 5)
    for _ in tqdm(range(lm_steps if answered else 0), desc="train gates (LM loss)", disable=not progress):
        batch = rng.sample(answered, min(batch_size, len(answered)))
        total = sum(r[0][2] for r in batch)  # answer tokens of the whole batch: the loss is their mean
        opt.zero_grad()
        # micro-batches, gradients accumulated: backward through the whole model keeps every
        # layer's activations, and 8 long BIG-bench prompts at once took 24 GB (killed)
        for k in range(0, len(batch), LM_MICRO_BATCH):
            chunk = batch[k : k + LM_MICRO_BATCH]
            padded, _, _ = pack(chunk)
            target = tail_targets([r[0][0] for r in chunk], [r[0][2] for r in chunk])
            with torch.enable_grad(), engine.routed(None, router.select):
                out = engine.model(**padded.model_inputs(), use_cache=False, logits_to_keep=target.shape[1] + 1)
                logits = out.logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                         reduction="sum") / total
                loss.backward()
        opt.step()
    for g in gates.values():
        g.requires_grad_(False)
    return router
