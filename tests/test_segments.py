"""Segment-held gating (`routing/segments.py`): the gates' prompt reading cut into runs, one
adapter held per answer part, switching where the answer starts its next part; and the per-token
mode kept for MeteoRA's recipe. Tiny random models; the gates' reading is faked where the test is
about what the policy does with it."""

from __future__ import annotations

import torch

from loraswitch.engine import Engine
from loraswitch.generate import FixedPolicy, SamplingParams, generate
from loraswitch.routing.cues import PartCues, list_item, turn_bridge
from loraswitch.routing.gate import GateRouter
from loraswitch.routing.segments import SegmentPolicy, answer_part, block_labels, question_label, runs, segment
from loraswitch.routing.token import TokenPolicy
from loraswitch.routing.units import question_blocks

KEY = "model.layers.0.self_attn.v_proj"


def _mass(labels: list[int], n: int = 4) -> torch.Tensor:
    """A fake reading: every token's layers all vote for its label (0 = no adapter)."""
    return torch.nn.functional.one_hot(torch.tensor(labels), n).float() * 20


def test_runs_absorb_a_short_blip_into_the_longer_neighbour():
    assert runs([1] * 6 + [2] * 2 + [1] * 3 + [3] * 6, min_run=4) == [(1, 0, 11), (3, 11, 17)]
    assert runs([2] * 3, min_run=5) == [(2, 0, 3)]  # a lone short run stays
    assert runs([], min_run=5) == []


def test_segment_gives_the_parts_in_order_with_context_attached_to_what_follows():
    # "Answer each part:" (no adapter), part A, a stray token of B inside A, then part B
    labels = [0] * 6 + [1] * 10 + [2] + [1] * 4 + [2] * 10
    per_token, order = segment(_mass(labels), window=3, min_run=4)
    assert order == [1, 2]
    assert per_token[:6] == [1] * 6  # the instruction is read with the part it introduces
    assert per_token[6:21] == [1] * 15 and per_token[21:] == [2] * 10
    assert segment(_mass([0] * 12))[1] == []  # no adapter anywhere: no plan


def test_segment_cuts_between_lines_only_when_told_where_lines_start():
    # one request read causally: its first words look like task 2 until its last words say task 1
    one_line = [2] * 8 + [1] * 12
    assert segment(_mass(one_line), window=3, min_run=4)[1] == [2, 1]
    labels, order = segment(_mass(one_line), window=3, min_run=4, line_starts=[])
    assert order == [1] and labels == [1] * 20  # the line as a whole: 12 votes for 1 against 8
    # two lines, one task each, and a header line of no adapter before them
    lines = [0] * 6 + [2] * 8 + [1] * 3 + [1] * 10
    labels, order = segment(_mass(lines), window=3, min_run=4, line_starts=[6, 17])
    assert order == [2, 1] and labels[:6] == [2] * 6 and labels[6:17] == [2] * 11


def test_answer_part_follows_numbering_then_lines():
    assert answer_part("negative") == 0
    assert answer_part("1. negative\n2") == 0  # "2" alone does not number a line yet
    assert answer_part("1. negative\n2. ") == 1
    assert answer_part("1. a\n2. b\n3. c") == 2
    assert answer_part("\n\nfirst") == 0  # empty lines start no part
    assert answer_part("first\nsecond") == 1


def _policy(engine: Engine, reading: list[int], prompt: str, cues: bool = False) -> SegmentPolicy:
    router = GateRouter(engine, {KEY: torch.zeros(3, 64)}, ["alpha", "beta"], cues=cues)
    policy = router.policy(engine, [prompt])
    assert isinstance(policy, SegmentPolicy) and policy.dynamic is None  # static: it may share a batch
    n = len(engine.base.chat_ids(prompt))
    fake = torch.zeros(n, len(engine.slots) + 1)
    fake[n - policy.tail - len(reading) : n - policy.tail] = _mass(reading, len(engine.slots) + 1)
    router.read = lambda engine, prompts, allowed=None: [fake]
    return policy


def _two_lines(tokenizer, marker: str = "") -> tuple[str, int, int]:
    """A prompt of two lines: (text, its user tokens, where the second line starts)."""
    prompt = marker.format(1) + " ".join(["word"] * 20) + "\n" + marker.format(2) + " ".join(["word"] * 20)
    pieces = [tokenizer.decode([t]) for t in tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    return prompt, len(pieces), next(i + 1 for i, p in enumerate(pieces) if "\n" in p)


def test_segment_policy_routes_prompt_runs_and_switches_at_the_next_part(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    a, b = engine.slots["alpha"], engine.slots["beta"]
    prompt, n_user, second = _two_lines(tiny_base.tokenizer)
    reading = [0] * 4 + [a + 1] * (second - 4) + [b + 1] * (n_user - second)
    policy = _policy(engine, reading, prompt)
    ids = tiny_base.chat_ids(prompt)
    policy.start(engine, [ids])
    assert policy.plans == [[a, b]]
    slots, weights = policy.prompt_choice(0, ids)
    tail, first_b = policy.tail, len(ids) - policy.tail - (n_user - second)
    assert slots[:first_b].flatten().tolist() == [a] * first_b  # preamble, context and part 1
    assert set(slots[first_b : len(ids) - tail].flatten().tolist()) == {b}
    assert slots[-tail:].flatten().tolist() == [a] * tail  # the answer starts with part 1's adapter
    assert torch.all(weights == 1)
    tok = tiny_base.tokenizer
    assert policy.step_choice(0, tok("1. x", add_special_tokens=False)["input_ids"]) == ([a], [1.0])
    assert policy.step_choice(0, tok("1. x\n2. ", add_special_tokens=False)["input_ids"]) == ([b], [1.0])
    assert policy.step_choice(0, tok("1. x\n2. y\n3. ", add_special_tokens=False)["input_ids"]) == ([b], [1.0])


def test_segment_policy_generation_holds_the_plan_and_reports_switches(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    a, b = engine.slots["alpha"], engine.slots["beta"]
    prompt, n_user, second = _two_lines(tiny_base.tokenizer)
    policy = _policy(engine, [a + 1] * second + [b + 1] * (n_user - second), prompt)
    out = generate(engine, [tiny_base.chat_ids(prompt)], policy, SamplingParams(max_new_tokens=6, stop_ids=set()))[0]
    tok = tiny_base.tokenizer
    for i, entry in enumerate(out.trace):  # each token comes from the adapter of the part being written
        part = answer_part(tok.decode(out.token_ids[:i], skip_special_tokens=True))
        assert entry["adapters"] == {["alpha", "beta"][min(part, 1)]: 1.0}
    assert out.events[0] == {"token_index": 0, "event": "switch", "adapter": "alpha"}
    assert out.routing["plan"] == ["alpha", "beta"] and out.routing["router"] == "gate"
    policy.traces[0] = [{"alpha": 1.0}, {"alpha": 1.0}, {"beta": 1.0}]
    assert [e["adapter"] for e in policy.events(0)] == ["alpha", "beta"]


def test_token_mode_keeps_per_layer_top_k_for_meteora(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    torch.manual_seed(0)
    router = GateRouter(engine, {KEY: torch.randn(3, 64)}, ["alpha", "beta"]).variant(mode="token", top_k=2, temperature=15.0)
    policy = router.policy(engine, ["hello"])
    assert type(policy) is TokenPolicy and policy.dynamic is not None
    routing = router.select(KEY, torch.randn(5, 64))
    assert routing.ids.shape == (5, 2)
    assert torch.all(routing.weights.max(-1).values < 0.9)  # temperature 15 flattens the pair


def test_reading_a_padded_batch_matches_reading_each_prompt(tiny_base, adapter_dir):
    """`TokenRouter.read` runs the batch left-padded in one forward; each prompt's reading must not
    depend on what it was batched with (the padding is masked, the rows are cut back)."""
    engine = Engine(tiny_base, [adapter_dir])
    torch.manual_seed(1)
    router = GateRouter(engine, {KEY: torch.randn(3, 64)}, ["alpha", "beta"])
    prompts = [tiny_base.chat_ids("hi"), tiny_base.chat_ids("a much longer prompt than the first one")]
    together = router.read(engine, prompts)
    for p, m in zip(prompts, together):
        alone = router.read(engine, [p])[0]
        assert m.shape == alone.shape == (len(p), len(engine.slots) + 1)
        assert torch.equal(m.argmax(-1), alone.argmax(-1))


def test_gates_trained_on_base_inputs_read_a_plain_base_forward(tiny_base, adapter_dir, tmp_path):
    """`teacher="base"` gates were fit to the base model's layer inputs, so their reading
    forward must apply no adapter (the flag survives save/load); the default gates read a forward
    routed by themselves."""
    from loraswitch.routing.base import NONE_CLASS
    from loraswitch.routing.gate import train_gates

    engine = Engine(tiny_base, [adapter_dir])
    data = {"alpha": [("date one", None), ("date two", None)], "beta": [("sum one", None)], NONE_CLASS: [("poem", None)]}
    router = train_gates(engine, data, epochs=1, lm_steps=0, batch_size=4, progress=False, teacher="base")
    router.save(tmp_path)
    loaded = GateRouter.load(tmp_path, engine)
    assert loaded.reads == "base" and loaded.variant(mode="token").reads == "base"
    seen: dict[str, list[torch.Tensor]] = {"routed": [], "base": []}
    prompt = [tiny_base.chat_ids("a prompt to read")]
    for reads in ("routed", "base"):
        loaded.reads = reads
        applied = []
        real = engine.ctx.routing_for
        engine.ctx.routing_for = lambda key, x, _a=applied, _r=real: _a.append(_r(key, x)) or _a[-1]
        try:
            loaded.read(engine, prompt)
        finally:
            engine.ctx.routing_for = real
        seen[reads] = applied
    assert seen["base"] and all(r is None for r in seen["base"])
    assert any(r is not None for r in seen["routed"])


def test_cues_go_on_past_each_part_end_with_the_next_parts_words_unshown(tiny_base):
    tok = tiny_base.tokenizer
    bridge, opening = turn_bridge(tiny_base)
    assert tok.decode(bridge) == "<|im_end|>\n<|im_start|>user\n" and tok.decode(opening).endswith("assistant\n")
    cues = PartCues(tiny_base)
    # row 0: parts the prompt does not list feed nothing
    cues.add([list_item(t) for t in ["Is the sky green?", "choice: Yes\nchoice: No"]])
    # row 1: a listed plan; the lead-in line and the list markers are dropped from the cues
    cues.add([list_item(t) for t in ["Answer each part on its own line.\n1. Add 2 and 3.\n", "2. Sort: 3, 1"]])
    assert cues.feed(0, [], 42, False) == (42, True) and cues.current(0) is None
    eos = tiny_base.end_of_turn_id

    def drain(row, generated):  # feed until the queue is empty: (shown tokens, unshown tokens)
        shown, hidden = [], []
        while True:
            t, visible = cues.feed(row, generated, 7, False)
            if not cues.queue[row] and t == 7:
                return shown, hidden
            (shown if visible else hidden).append(t)
            if visible:
                generated.append(t)

    generated: list[int] = []
    shown, hidden = drain(1, generated)  # the first token: part 1's number, then its cue
    assert tok.decode(shown) == "1. " and hidden == bridge + tok("Add 2 and 3.", add_special_tokens=False)["input_ids"] + opening
    assert cues.current(1) == 0
    generated += tok("5", add_special_tokens=False)["input_ids"]
    assert cues.feed(1, generated, 9, False) == (9, True)  # mid-part: the sampled token goes on
    generated.append(9)
    first, _ = cues.feed(1, generated, eos, True)  # part 1's end of turn: part 2 begins instead of stopping
    rest, hidden = drain(1, generated)
    assert tok.decode([first] + rest) == "\n2. " and tok.decode(hidden).endswith("Sort: 3, 1<|im_end|>\n<|im_start|>assistant\n")
    assert cues.current(1) == 1
    assert cues.feed(1, generated, eos, True) == (eos, True)  # the plan's last part: the stop ends the row
    assert cues.extra_steps() == sum(len(c) for c in cues.cues[1]) + len(tok("1. ")["input_ids"]) + len(tok("\n2. ")["input_ids"])


def test_unshown_tokens_are_read_into_the_cache_as_prompt_tokens_are(tiny_base, adapter_dir):
    """`Policy.feed`: tokens kept out of the answer still condition what follows, exactly as if
    they had been in the prompt, and the answer holds only the shown tokens."""
    engine = Engine(tiny_base, [adapter_dir])
    prompt, cue = tiny_base.chat_ids("hello there"), [300, 301, 302, 303]

    class Cued(FixedPolicy):
        def feed(self, row, generated, token, stops):
            self.fed = getattr(self, "fed", 0) + 1
            return (cue[self.fed - 1], False) if self.fed <= len(cue) else (token, True)

        def extra_steps(self):
            return len(cue)

    params = SamplingParams(max_new_tokens=5, stop_ids=set())
    cued = generate(engine, [prompt], Cued([([engine.slots["alpha"]], [1.0])]), params)[0]
    plain = generate(engine, [prompt + cue], FixedPolicy([([engine.slots["alpha"]], [1.0])]), params)[0]
    assert cued.token_ids == plain.token_ids and len(cued.token_ids) == 5 and len(cued.trace) == 5


def test_segment_policy_with_cues_numbers_the_parts_and_switches_adapter(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    a, b = engine.slots["alpha"], engine.slots["beta"]
    prompt, n_user, second = _two_lines(tiny_base.tokenizer, "{}. ")
    policy = _policy(engine, [a + 1] * second + [b + 1] * (n_user - second), prompt, cues=True)
    chosen = []
    step = policy.step_choice
    policy.step_choice = lambda row, generated: chosen.append(step(row, generated)) or chosen[-1]
    # every token the random model writes (but the parts' numbers) ends a turn: each part ends at its first token
    numbers = set(tiny_base.tokenizer("1. \n2. ", add_special_tokens=False)["input_ids"])
    out = generate(engine, [tiny_base.chat_ids(prompt)], policy,
                   SamplingParams(max_new_tokens=12, stop_ids=set(range(len(tiny_base.tokenizer))) - numbers))[0]
    assert out.text == "1. \n2. " and out.finish_reason == "stop"
    assert out.routing["cue_tokens"] == len(policy.cues.cues[0][0]) + len(policy.cues.cues[0][1])
    slots = [c[0][0] for c in chosen]
    assert slots[0] == a and slots[-1] == b and sum(x != y for x, y in zip(slots, slots[1:])) == 1
    # part 2's number and cue are read by beta: 3 + its cue's tokens
    assert slots.count(b) == len(tiny_base.tokenizer("\n2. ", add_special_tokens=False)["input_ids"]) + len(policy.cues.cues[0][1])
    assert out.routing["plan"] == ["alpha", "beta"]


MULTI = ("Answer every bracketed question, in order.\n\nExample 1:\n[INST] Add 2 and 3. [/INST]\n[INST] Sort: 3, 1 [/INST]\n"
         "1. 5\n2. 1, 3\n\nNow answer these.\n[INST] Is the sky green?\nchoice: Yes\nchoice: No [/INST]\n<q>Sort: 9, 4</q>")


def test_question_blocks_are_the_blocks_that_carry_no_answer_and_need_two():
    blocks = question_blocks(MULTI)
    # the worked example's blocks (their answers follow them) are context; a block is one question
    # however many lines it has; any tag reads as a block, not only [INST]
    assert [u.text for u in blocks] == ["Is the sky green?\nchoice: Yes\nchoice: No", "Sort: 9, 4"]
    assert all(MULTI[u.start : u.end] == u.text for u in blocks)
    assert question_blocks("[INST] Is the sky green?\nchoice: Yes\nchoice: No [/INST]") == []  # one question: never split
    assert question_blocks("Is the sky green?\nchoice: Yes\nchoice: No") == []
    assert question_blocks("1. Add 2 and 3.\n2. Sort: 3, 1") == []  # list items stay with the line reading


def test_block_labels_give_context_to_the_question_after_it():
    assert block_labels(10, [(2, 4), (6, 8)], [3, 1]) == [3] * 4 + [1] * 6
    assert question_label(_mass([0, 0, 2, 2, 1])) == 2  # later votes weigh more: 2*3+2*4 > 1*5
    assert question_label(_mass([0] * 6)) == 0  # read as no adapter: answered without one


def test_segment_policy_plans_one_part_per_question_block_read_alone(tiny_base, adapter_dir):
    engine = Engine(tiny_base, [adapter_dir])
    a, b = engine.slots["alpha"], engine.slots["beta"]
    router = GateRouter(engine, {KEY: torch.zeros(3, 64)}, ["alpha", "beta"], cues=True)
    policy = router.policy(engine, [MULTI])
    ids = tiny_base.chat_ids(MULTI)
    blocks = question_blocks(MULTI)
    # read in place, every token looks like alpha; each question read alone says beta, then alpha
    alone = {tuple(tiny_base.chat_ids(u.text)): label for u, label in zip(blocks, [b + 1, a + 1])}
    reads = []

    def read(engine, prompts, allowed=None):
        reads.append(len(prompts))
        return [_mass([alone.get(tuple(p), a + 1)] * len(p), len(engine.slots) + 1) for p in prompts]

    router.read = read
    policy.start(engine, [ids])
    assert reads == [1, 2]  # the prompt, then its two questions in one forward
    assert policy.plans == [[b, a]]
    tok = tiny_base.tokenizer
    asks = [tok.decode(c[len(policy.cues.bridge) : -len(policy.cues.opening)]) for c in policy.cues.cues[0]]
    assert asks == [u.text for u in blocks]  # each cue asks its block's own words
    slots = policy.prompt_slots[0].tolist()
    end = len(ids) - policy.tail
    n_user = len(tok(MULTI, add_special_tokens=False)["input_ids"])
    spans = [span for span, _ in policy._question_spans(0, n_user)]
    assert tok.decode(ids[end - n_user + spans[0][0] : end - n_user + spans[0][1]]).strip().startswith("Is the sky green?")
    first_end = end - n_user + spans[0][1]
    # the instruction and the worked examples are context of question 1; " [/INST]\n<q>" leads into question 2
    assert set(slots[:first_end]) == {b} and set(slots[first_end:end]) == {a}
    assert first_end < end - n_user + spans[1][0]
