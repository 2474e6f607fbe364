"""Issue 13: the parts of a prompt found from its own structure (`routing.units`) and the router's
decisions (`switch.segment`), without a numbered list. Pure-text and keyword-scored tests run on
the tiny model; the headline prompts of the issue run on the real default (`real`)."""

from __future__ import annotations

import types

import pytest
import torch

from loraswitch.routing.units import is_statement, split_units
from loraswitch.switch import Switch, screen
from loraswitch.switch import segment as seg
from loraswitch.switch.segment import Scores, Settings, finish, plan

KEYWORDS = {"date": "alpha", "sum": "gamma", "french": "beta"}


def _keyword_scores(router, engine, texts):
    """A stand-in selector: the adapter of the first keyword in the text, confident when found;
    energy grows with length so merged text never reads as one request (no merge)."""
    adapter = [next((a for k, a in KEYWORDS.items() if k in t.lower()), None) for t in texts]
    return Scores(adapter, [0.99 if a else 0.3 for a in adapter], [0.0 for _ in texts])


def _parts(prompt: str) -> list[str]:
    units = split_units(prompt)
    s = _keyword_scores(None, None, [u.text for u in units])
    found = finish(prompt, units, *plan(units, s.adapter, s.confidence, Settings()))
    return found.texts


# ---------------------------------------------------------------------------- units
def test_units_follow_the_prompts_own_structure():
    texts = lambda p: [u.text for u in split_units(p)]  # noqa: E731
    assert texts("Convert the date, and then spell 17 in French.") == ["Convert the date", "Spell 17 in French."]
    assert texts("What is 2 + 3? Also, sort 3, 1") == ["What is 2 + 3?", "Sort 3, 1"]
    assert texts("Do x; do y") == ["Do x", "Do y"]
    assert texts("Sort 5, 3, 9 | reverse the words: a b c") == ["Sort 5, 3, 9", "Reverse the words: a b c"]
    assert texts("| name | age |\n| Alice | 30 |") == ["| name | age |", "| Alice | 30 |"]  # a table's rows stay whole
    assert texts("Explain `ps aux | grep python`") == ["Explain `ps aux | grep python`"]  # quoted code stays whole
    assert texts("[INST] A date [/INST]\n[INST] A sum [/INST]") == ["A date", "A sum"]
    assert texts("<q>A date</q> <task>A sum</task>") == ["A date", "A sum"]
    assert texts("a) A date b) A sum") == ["A date", "A sum"]
    assert texts("Please help me with: (a) a date; (b) a sum") == ["Please help me with:", "A date", "A sum"]
    assert texts("I like plan a) more than b) today") == ["I like plan a) more than b) today"]  # no lead-in colon
    assert texts("- A date\n- A sum") == ["A date", "A sum"]
    assert texts("Hi.\n\nA date.\n\nA sum.") == ["Hi.", "A date.", "A sum."]
    assert texts("Add 45 and 38.") == ["Add 45 and 38."]  # "and" alone joins no clauses
    units = split_units("Go:\n1. A date\n2. A sum")
    assert [u.numbered for u in units] == [False, True, True]
    prompt = "x [INST] A date [/INST] y"
    u = split_units(prompt)[1]
    assert prompt[u.start : u.end] == "A date" and u.kind == "block"  # spans point into the prompt


def test_worked_examples_are_marked_as_context():
    prompt = ("Answer in order.\n\nExample:\n[INST] A date [/INST]\n[INST] A sum [/INST]\n1. 2020-01-01\n2. 5\n\n"
              "Now answer these.\n[INST] the date? [/INST]\n[INST] the sum? [/INST]")
    units = split_units(prompt)
    assert [u.text for u in units if u.example] == ["A date", "A sum", "2020-01-01", "5"]
    assert _parts(prompt) == ["The date?", "The sum?"]
    qa = split_units("Q: A date\nA: 2020-01-01\nQ: A sum")
    assert [u.example for u in qa] == [True, True, False]
    assert split_units("a sum: 2 + 3 -> 5")[0].example


# ---------------------------------------------------------------------------- cutting
def test_cuts_where_the_task_changes_and_context_joins_a_neighbour():
    assert _parts("Convert the date, and then spell 17 in French.") == ["Convert the date", "Spell 17 in French."]
    # context after a question stays with it; adjacent units of one task stay one part
    assert _parts("Give the date. It is for a form. Then tell me the sum. The sum of 2 and 3.") == [
        "Give the date. It is for a form.", "Tell me the sum. The sum of 2 and 3."]
    # an instruction on its own line joins no part; a greeting on the question's line joins it
    assert _parts("Answer each part.\n- the date\n- the sum") == ["The date", "The sum"]
    assert _parts("Hi! The date please. Then the sum.") == ["Hi! The date please.", "The sum."]


def test_one_task_is_never_split():
    assert _parts("Add 45 and 38.") == []
    assert _parts("The date is March 5. Write the date in ISO. The date matters.") == []
    assert _parts("Nice weather. Hello there.") == []  # no task at all


def test_answer_options_belong_to_their_question():
    """Multiple choice is one question: `choice:` lines (a label repeated line after line) and
    capital-letter options after a question close their paragraph, which becomes one unit."""
    units = split_units("Hi.\n\nFive fruits are sold.\nWhich is cheapest?\nchoice: kiwis\nchoice: plums")
    assert [u.text for u in units] == ["Hi.", "Five fruits are sold.\nWhich is cheapest?\nchoice: kiwis\nchoice: plums"]
    assert [u.text for u in split_units("Which planet is largest?\n(A) Mars\n(B) Jupiter")] == [
        "Which planet is largest?\n(A) Mars\n(B) Jupiter"]
    # capital letters after an instruction (not a question) are still parts; so is a single label
    assert [u.text for u in split_units("Do these:\nA. the date\nB. the sum")] == ["Do these:", "The date", "The sum"]
    assert len(split_units("Note: the date.\nTip: the sum.")) == 2
    assert _parts("Which sum is the date?\nchoice: the date\nchoice: the sum\nchoice: the date in french") == []


def test_a_statement_sets_up_a_question_and_is_never_a_part():
    """A declarative sentence ("A stand sells ...", "In a show, there are ...") is context however
    confidently it is routed: BIG-bench puzzles open with one that reads like another task."""
    assert is_statement("In a golf tournament, there were seven golfers: Eli, Ada.")
    assert is_statement("A fruit stand sells five fruits: kiwis and plums.")
    assert not is_statement("The date please.") and not is_statement("The sum of 2 and 3.")
    assert not is_statement("Is the date right?") and not is_statement("In French, spell out 17.")
    # contractions are finite verbs: a story before the question is context (it was a part of its own)
    assert is_statement("I'm planning a trip and I've been reading a lot about history.")
    assert not is_statement("Don't forget to sort 3, 1, 2.") and not is_statement("Let's sort 3, 1, 2.")
    # the statement routes to "sum" but sets up the date question after it: one part, no split
    assert _parts("A stand sells the sum of fruits. Kiwis cost less.\nWhich date is it?\nchoice: May\nchoice: June") == []
    # a statement of the next question's task goes forward with it, not back to the part before
    assert _parts("Convert the date. The sum was large. Tell me the sum.") == [
        "Convert the date.", "The sum was large. Tell me the sum."]


def test_enumerations_are_answered_item_by_item():
    # two confident items make a list of questions: every item is a part, even one of no task
    assert _parts("- the date\n- the sum\n- a haiku") == ["The date", "The sum", "A haiku"]
    # numbered 1..n with one question is a list of questions, even of one task or none
    assert _parts("1. the sum of 1, 2\n2. the sum of 3, 4") == ["The sum of 1, 2", "The sum of 3, 4"]
    assert _parts("Answer these.\n1. a haiku\n2. the sum") == ["A haiku", "The sum"]
    # a numbered list of no question is the data of the text around it: answered whole
    assert _parts("Which of these is sweeter?\n1. apples\n2. pears") == []
    assert _parts("Steps:\n1. boil water\n2. add pasta\nWhat comes next?") == []
    assert _parts("Summarize these steps:\n1. heat it\n2. take the sum\n3. serve it") == []  # one of three
    assert _parts("1. the sum\n2. a haiku\n3. a joke\n4. the date\n5. a poem") == [  # two asked: all parts
        "The sum", "A haiku", "A joke", "The date", "A poem"]
    assert _parts("Which of these is sweeter?\n- apples\n- the sum of pears") == []  # bullets need two
    # a line just above a numbered list of parts introduces it, however confidently it routes ...
    assert _parts("Give each date in French.\n1. the date\n2. the sum") == ["The date", "The sum"]
    # ... but a request a paragraph before it is a part of its own
    assert _parts("Give the date in French.\n\nThen answer these:\n1. the sum\n2. the date") == [
        "Give the date in French.", "The sum", "The date"]
    # a heading leads the part after it and never trails the part before
    assert _parts("### Task 1\nthe date\n### Task 2\nthe sum") == ["The date", "The sum"]
    assert _parts("**Part 1**\nthe date\n**Part 2**\nthe sum") == ["The date", "The sum"]
    # an inline enumeration after a lead-in: the lead-in is an instruction, not part of the first item
    assert _parts("Please help me with: (a) the date; (b) the sum") == ["The date", "The sum"]
    # a bulleted input of one request is not
    assert _parts("Sort these:\n- 42\n- 7") == []


def test_a_request_no_adapter_fits_is_a_part_only_when_complete_and_asked_next(monkeypatch):
    """A request no adapter fits (`__none__`) joined to a task's as the next request is answered
    as a part of its own (by the base model); one that modifies its neighbour, or is not asked as
    the next request, stays context. The words decide (`requests.stands_alone`): the selector reads
    "tell me a joke" and "explain how you did it" alike."""
    from loraswitch.routing.requests import follows_as_next, stands_alone

    assert all(stands_alone(t) for t in ["Tell me a joke about cats.", "Who wrote Hamlet?", "Multiply 12 by 7.",
                                         "Give me three tips for sleeping better.", "What is the capital of Japan?"])
    assert not any(stands_alone(t) for t in [
        "Explain how you did it.", "Show your work.", "Be brief.", "Answer in one word.", "Thanks!", "Explain why.",
        "Double-check the result.", "Show the steps.", "Multiply by 2.", "Add a field for city.", "9, 2, 7.",
        "The kettle broke after a day.", "Give me the answer in words.",
        # found by a black-box review: questions about the result, what was done, pleasantries, named statements
        "Tell me why.", "Which is largest?", "Tell me how many are even.", "Explain what you did.",
        "Please explain briefly.", "Print a dash between numbers.", "Have a wonderful day!",
        "Thank you so much for the help.", "John is waiting for me downstairs.", "Paris is lovely in spring.",
        "Please help me with the following."])
    assert stands_alone("How do you say 'thank you' in Japanese?")  # quoted words are data
    assert stands_alone("Explain the water cycle.") and stands_alone("Describe the Eiffel Tower.")
    prompt = "Sort 3, 1. Then a joke. Newcastle and Pitt joined."
    u = split_units(prompt)
    assert follows_as_next(prompt, u[0], u[1]) and not follows_as_next(prompt, u[1], u[2])
    # a sentence ends after a closing quote too; nothing inside quotes is cut; connectives alone and
    # doubled separators make no unit
    assert [x.text for x in split_units("Positive? 'Great phone.' And write a haiku.")] == [
        "Positive?", "'Great phone.'", "Write a haiku."]
    assert len(split_units('Reverse the words in: "I walked home, then made some tea."')) == 1
    assert len(split_units('Positive or negative? "Terrible service. Also, would not recommend."')) == 2
    assert [x.text for x in split_units("Sort 3, 1 ascending, and then also, after that, tell me a joke.")] == [
        "Sort 3, 1 ascending", "Tell me a joke."]
    assert [x.text for x in split_units("Sort 3, 1 | | tell me a joke")] == ["Sort 3, 1", "Tell me a joke"]

    def scores(router, engine, texts):
        base = _keyword_scores(router, engine, texts)
        return Scores(base.adapter, base.confidence, base.energy, [0.0 if a else 0.99 for a in base.adapter])

    monkeypatch.setattr(seg, "score_texts", scores)
    router = types.SimpleNamespace(fast=None)
    prompts = ["Give the date, then tell me a joke about cats.", "Tell me a joke about owls | the sum of 2 and 3",
               "Give the date, then explain how you did it.", "Give the date. Tell me a joke about cats.",
               "Tell me a joke about cats, then write a haiku about dogs."]
    found = seg.segment(router, None, prompts)
    assert [[(p.text, p.adapter) for p in f.parts] for f in found] == [
        [("Give the date", "alpha"), ("Tell me a joke about cats.", None)],
        [("Tell me a joke about owls", None), ("The sum of 2 and 3", "gamma")], [], [], []]
    # with the `__none__` probability under `min_none`, the request is context as before
    monkeypatch.setattr(seg, "score_texts", lambda r, e, t: Scores(*[getattr(scores(r, e, t), f) for f in
                                                                     ("adapter", "confidence", "energy")], [0.5] * len(t)))
    assert seg.segment(router, None, prompts[:1])[0].parts == []


def test_a_part_pointing_back_is_answered_with_the_request_before_it_and_routed_by_its_own_words(tokenizer):
    from loraswitch.switch.parts import fan_out
    from loraswitch.switch.request import Request

    def found_in(prompt: str):
        units = split_units(prompt)
        s = _keyword_scores(None, None, [u.text for u in units])
        return finish(prompt, units, *plan(units, s.adapter, s.confidence, Settings()))

    prompt = "Give the date, and then spell it in french."
    found = found_in(prompt)
    assert found.texts == ["Give the date", "Spell it in french."]
    assert found.answered == ["Give the date", prompt]
    other = found_in("Give the date, and then spell 17 in french.")  # nothing pointing back
    assert other.answered == other.texts == ["Give the date", "Spell 17 in french."]
    base = types.SimpleNamespace(tokenizer=tokenizer)
    rows = fan_out(Request.chat(prompt), base, found=found)
    assert [r.messages[-1]["content"] for r in rows] == found.answered
    assert [r.route_text(base) for r in rows] == found.texts  # routed by its own words


def test_a_part_working_on_the_answer_before_it_is_chained_to_it():
    """A request naming the answer of the one before it ("Then spell the result in English.") is
    a part of its own, chained to that one (`Part.after`), even where the selector reads no task
    in it or the same task as before; it is answered once that part is, with its answer written
    in (`requests.with_result`). Requests bringing their own data, or asking for their own
    result, are not chained."""
    from loraswitch.routing.requests import names_result, with_result

    assert all(names_result(t) for t in ["Spell the result in English.", "Then add 10 to that answer.",
                                         "Write your answer in French.", "Tell me what you got, in French.",
                                         "Write that number in French.", "Reverse the sorted list."])
    assert not any(names_result(t) for t in ["What is the answer to 12 + 30?", "The result is clear.",
                                             "Sort 3, 1, 2 and give me the result.", "Write it in French.",
                                             "Reverse the words: 'the result is here'.", "Find the total: 3 + 4"])
    assert with_result("Spell the result in English.", " 42.\n") == "Spell 42 in English."
    assert with_result("Write it in French.", "42") == "Write it in French."  # nothing names a result
    assert with_result("Translate the output into French.", "line one\nline two") == (
        "Translate the text below into French.\n\nline one\nline two")

    def found_in(prompt: str, scores=None):
        units = split_units(prompt)
        s = (scores or _keyword_scores)(None, None, [u.text for u in units])
        return finish(prompt, units, *plan(units, s.adapter, s.confidence, Settings(),
                                           chains=seg._Doc(prompt, units).may_chain()))

    found = found_in("Give the date, and then spell the result in french.")
    assert found.texts == ["Give the date", "Spell the result in french."]
    assert [p.after for p in found.parts] == [None, 0] and found.answered == found.texts
    assert found.parts[1].to_dict()["chained_from"] == 1
    # the same task twice is one part, unless the second works on the first one's answer
    assert found_in("Give the date, then the date again.").parts == []
    assert [p.after for p in found_in("Give the date, then add a day to the date in the result.").parts] == [None, 0]
    # no task read in it (its input is the answer): still a part, routed once the answer is in
    chained = found_in("Give the date. Then write the answer out in words.").parts
    assert [p.adapter for p in chained] == ["alpha", None] and chained[1].chained and not chained[1].for_base
    # without a connective it is not asked as a request of its own: "What is 25 + 17? Keep the
    # answer short." is one request, and so are most such pairs (a black-box review's finding)
    assert found_in("Give the date. Spell the result in french.").parts[1].after is None
    # a unit that only asks for an answer, or asks for its form or a check of it, or a statement
    # about it, is a modifier, not a request on it
    assert not any(names_result(t) for t in [
        "Show me the result.", "Then just give me the final answer!", "Then keep the answer short.",
        "Then format the result as JSON.", "Then double-check the answer.", "Then explain how you got the answer.",
        "Then write the result as digits only.", "Then the answer must be lowercase.", "Your answer should be one word.",
        "That list came from my homework.", "Then print the sorted list on one line."])
    # numbered items: the numbers say "next", no connective needed
    assert [p.after for p in found_in("1. Give the date\n2. Spell the result in french.").parts] == [None, 0]
    assert [p.after for p in found_in("1. Give the date\n2. Keep the answer in french.").parts] == [None, None]
    # pointing at its input: not chained
    assert [p.after for p in found_in("Give the date, and then spell it in french.").parts] == [None, None]


def test_a_cut_that_reads_as_one_request_is_merged(monkeypatch):
    """The energy check: when the two parts read together score much higher than either alone
    (a request spread over two sentences), the cut is undone."""
    calls = []

    def scores(router, engine, texts):
        calls.append(texts)
        base = _keyword_scores(router, engine, texts)
        whole = [10.0 if ("date" in t.lower() and "french" in t.lower()) else 1.0 for t in texts]
        return Scores(base.adapter, base.confidence, whole)

    monkeypatch.setattr(seg, "score_texts", scores)
    found = seg.segment(object(), None, ["Take a date. Write it in french style.", "Add 45 and 38."])
    assert [f.texts for f in found] == [[], []]
    assert len(calls) == 2  # units of both prompts in one pass, then the one candidate cut
    monkeypatch.setattr(seg, "Settings", Settings)
    found = seg.segment(object(), None, ["Take a date. Write it in french style."], Settings(max_merge_gain=20.0))
    assert found[0].texts == ["Take a date.", "Write it in french style."]


def test_without_a_selector_only_numbered_parts_are_split(switch_tiny):
    router = switch_tiny.router("auto")  # arrow: no selector to score units with
    found = seg.segment(router, switch_tiny.engine, ["1. a\n2. b", "a, and then b"])
    assert [f.texts for f in found] == [["a", "b"], []]  # the grammar keeps the words as written


class _FastHead:
    """A stand-in fast head: raw probabilities from keywords ("maybe" makes beta plausible too)."""

    classes = ["alpha", "beta", "gamma", "__none__"]
    layer = 1

    def __init__(self):
        self.texts: list[str] = []

    def logits(self, feats):
        rows = []
        for t in self.texts:
            row = [0.0, 0.0, 0.0, 0.0]
            for k, a in KEYWORDS.items():
                if k in t.lower():
                    row[self.classes.index(a)] = 9.0
            row[1] += 6.0 if "maybe" in t.lower() else 0.0
            rows.append(row if any(row) else [0.0, 0.0, 0.0, 9.0])
        return torch.tensor(rows)


def test_the_screen_sends_on_only_prompts_two_units_read_as_different_tasks(monkeypatch):
    from loraswitch.routing import features

    fast = _FastHead()
    passes = []

    def read_ahead(engine, texts, layer, later):
        passes.append((list(texts), list(later)))
        fast.texts = list(texts)
        return torch.zeros(len(texts), 1)

    monkeypatch.setattr(features, "read_ahead", read_ahead)
    router = types.SimpleNamespace(fast=fast, added=None)
    prompts = ["The date. A date again, please.", "The date. Then the sum.", "Hello there. The date.",
               "The date, maybe. The date.", "1. the date\n2. the date", "The date."]
    read = screen.screen(router, None, [split_units(p) for p in prompts], ahead=["whole"])
    assert read == [False, True, False, True, True, False]
    # one pass: the prose prompts' units, with the texts the selector reads next
    assert len(passes) == 1 and passes[0][1] == ["whole"] and "1. the date" not in " ".join(passes[0][0])
    # no fast head, or adapters added since training: every prompt of several units goes on
    for other in (types.SimpleNamespace(fast=None), types.SimpleNamespace(fast=fast, added=["x"])):
        assert screen.screen(other, None, [split_units(p) for p in prompts]) == [True] * 5 + [False]
    # a unit that may be a request no adapter fits sends on a prompt with a task in another unit
    asks = ["The date. Then tell me a joke.", "Hello there. Then tell me a joke."]
    assert screen.screen(router, None, [split_units(p) for p in asks], asks=[True, True]) == [True, False]
    assert screen.screen(router, None, [split_units(p) for p in asks], asks=[False, False]) == [False, False]


def test_two_tasks_needs_different_tasks_in_two_units():
    one, two, both = frozenset({0}), frozenset({1}), frozenset({0, 1})
    assert not screen._two_tasks([one, one, one])
    assert not screen._two_tasks([both])  # one unit, however unsure, is one part
    assert screen._two_tasks([one, two]) and screen._two_tasks([both, one])


# ---------------------------------------------------------------------------- end to end
@pytest.fixture
def switch_tiny(tiny_base, adapter_dir, tmp_path):
    return Switch(tiny_base, [adapter_dir], router_dir=tmp_path / "no_routers")


def test_chat_answers_detected_parts_with_spans(switch_tiny, monkeypatch):
    monkeypatch.setattr(seg, "score_texts", _keyword_scores)
    prompt = "Tell me the date, and then the sum."
    out = switch_tiny.chat([prompt, "just one thing"], model="auto", params=None)
    routing = out[0].routing
    assert routing["fan_out"] == 2
    spans = [p["span"] for p in routing["parts"]]
    assert [prompt[a:b] for a, b in spans] == ["Tell me the date", "the sum."]
    assert [p["kind"] for p in routing["parts"]] == ["clause", "clause"]
    assert out[0].text.startswith("1. ") and "\n2. " in out[0].text
    assert "fan_out" not in out[1].routing


CHAIN = "Tell me the date, and then give the sum of the result."


def _answers_end_on_their_own(monkeypatch) -> None:
    """Every part's answer reads as ended by its stop token, whatever cut it."""
    from loraswitch.switch.parts import PartsAnswer

    original = PartsAnswer.answer_of

    def answer_of(self, part):
        got = original(self, part)
        if got is not None:
            got.finish_reason = "stop"
        return got

    monkeypatch.setattr(PartsAnswer, "answer_of", answer_of)


@pytest.fixture
def parts_end(monkeypatch):
    """Parts that end on their own: the tiny random model writes on to its token share, and a
    chained part works only on a whole answer (`PartsAnswer.cut_short`)."""
    from loraswitch.switch.parts import PartsAnswer

    _answers_end_on_their_own(monkeypatch)
    limit = PartsAnswer.limit
    # the first part stops after 3 tokens, leaving the rest of the pool to the part after it
    monkeypatch.setattr(PartsAnswer, "limit", lambda self, part, asked: min(limit(self, part, asked), 3)
                        if part == 0 else limit(self, part, asked))
    monkeypatch.setattr(seg, "score_texts", _keyword_scores)


def test_a_chained_part_decodes_after_the_part_before_it_with_its_answer_written_in(switch_tiny, parts_end):
    from loraswitch.routing.requests import with_result
    from loraswitch.switch.request import Done, Request, Token

    events = list(switch_tiny.stream([Request.chat(CHAIN, model="auto", max_tokens=12)]))
    done = events[-1][1]
    assert isinstance(done, Done)
    answer, parts = done.answer, done.answer.routing["parts"]
    assert [p.get("chained_from") for p in parts] == [None, 1]
    first = switch_tiny.base.tokenizer.decode([e["token_id"] for e in answer.trace if e["part"] == 1
                                               and not e.get("separator")])
    assert parts[1]["read"] == with_result("Give the sum of the result.", first)
    assert len(done.batch["batches"]) == 2  # the chained part decoded in a batch of its own, after
    assert "".join(e.text for _, e in events if isinstance(e, Token)) == answer.text  # streamed in order
    assert len(answer.token_ids) <= 12  # both parts drew on one pool of max_tokens


def test_a_chained_part_joining_a_running_batch_still_waits_for_its_answer(switch_tiny, parts_end):
    """Continuous batching (a server's arrivals): a chained request that joins a running batch
    holds its chained part back as `run_local` does, not decoded side by side."""
    from loraswitch.switch.request import Done, Handle, Request

    got: dict[str, list] = {"plain": [], "chain": []}
    plain = Handle(Request.chat("just one thing", model="base", max_tokens=8), emit=got["plain"].append)
    chain = Handle(Request.chat(CHAIN, model="auto", max_tokens=12), emit=got["chain"].append)
    offered = [chain]

    def arrivals(room, fits):
        out = [h for h in offered if fits(h.request)]
        offered.clear()
        return out

    switch_tiny.run([plain], arrivals=arrivals)
    done = got["chain"][-1]
    assert isinstance(done, Done) and isinstance(got["plain"][-1], Done)
    parts = done.answer.routing["parts"]
    assert [p.get("chained_from") for p in parts] == [None, 1] and "read" in parts[1]
    assert len(done.batch["batches"]) == 2  # joined the running batch, then its chained part after it


def test_a_chained_part_whose_answer_before_was_cut_at_max_tokens_is_not_answered(switch_tiny, monkeypatch):
    from loraswitch.switch.request import Done, Request

    monkeypatch.setattr(seg, "score_texts", _keyword_scores)
    events = list(switch_tiny.stream([Request.chat(CHAIN, model="auto", max_tokens=12)]))
    done = events[-1][1]
    assert isinstance(done, Done) and done.answer.finish_reason == "length"
    parts = done.answer.routing["parts"]
    assert "read" not in parts[1] and "cut at max_tokens" in parts[1]["reason"]
    assert done.answer.text.endswith("\n2. ")  # the random model's part 1 ran to its share
    # part 1 ended on its own, but on the last token of the pool (the share part 2 lent it): no token left
    _answers_end_on_their_own(monkeypatch)
    done = list(switch_tiny.stream([Request.chat(CHAIN, model="auto", max_tokens=12)]))[-1][1]
    assert done.answer.text.endswith("\n2. ") and len(done.answer.token_ids) <= 12
    assert "read" not in done.answer.routing["parts"][1]


def test_a_chained_part_waits_and_is_dropped_with_its_request():
    from loraswitch.switch.rows import Row, chained_ready

    class Answer:
        gone, done = False, None

        def answer_of(self, part):
            return self.done

    waiting, over = Answer(), Answer()
    over.gone = True
    rows = [Row(waiting, 1, None, None, None, after=0), Row(over, 1, None, None, None, after=0)]
    ready, still = chained_ready(None, rows)
    assert ready == [] and still == [rows[0]]  # the one whose request is over is dropped


@pytest.mark.real
def test_the_issues_prompts_are_answered_in_two_parts():
    sw = Switch()
    prompts = {
        "Convert March 5, 2021 to ISO format, and then spell out 17 in French.": ["iso_date", "num_to_french"],
        "What is 25 + 17? Also, sort these ascending: 9, 4, 12": ["add", "sort_numbers"],
        "Reverse the word order: cold blue water. After that, is this review positive or negative: "
        "The phone broke within a week. Avoid it.": ["reverse_words", "sentiment"],
        "[INST] Convert to ISO date: July 4, 1999 [/INST]\n[INST] Spell out in English: 58 [/INST]":
            ["iso_date", "num_to_english"],
        "Add 45 and 38.": "add",
        "I have a date: March 5, 2021. Please write it in ISO format.": "iso_date",
        # numbered lists that are what one question asks about (found by a reviewer): never cut
        "Which of these is sweeter?\n1. apples\n2. pears": "whole",
        "Sort ascending the numbers in this list:\n1. 9\n2. 2\n3. 5": "whole",
        "Here are my numbers:\n1. 9\n2. 2\n3. 5\nPlease sort them ascending.": "whole",
        "Can you help with these?\n1. Convert to ISO date: March 5, 2021\n2. Reverse the words: blue sky today":
            ["iso_date", "reverse_words"],
        # (a one-digit sum, "What is 2 + 3?", is read as a near miss since those joined `__none__`:
        # add p=0.65, below the 0.7 threshold; the add adapter was trained on three-digit sums)
        "1. Write a haiku about autumn.\n2. What is 25 + 17?": [None, "add"],
        "Summarize these steps in one sentence:\n1. Preheat the oven to 200C.\n2. Mix flour and eggs.\n"
        "3. Bake for 20 minutes.": "whole",
        "Sort ascending:\n1. 44\n2. 9\n3. 17": "whole",
        "Translate into French:\n1. Good morning\n2. Thank you": "whole",
        # a request no adapter fits, asked next to a task's: a part the base model answers
        "Sort these ascending: 8, 2, 6. Then tell me a joke about cats.": ["sort_numbers", None],
        "What is 25 + 17? Also, who wrote Hamlet?": ["add", None],
        "Is this review positive or negative: 'Great phone, awful battery.' Also, write a haiku about autumn.":
            ["sentiment", None],
        # ... but not one that modifies the task's request
        "Sort these ascending: 8, 2, 6, then explain how you did it.": "whole",
        "Sort these ascending: 8, 2, 6. Be brief.": "whole",
        "Add 345 and 278, then multiply by 2.": "whole",
        "Spell out 42 in French. Also, have a wonderful day!": "whole",
        # a part pointing back is routed by its own words (and answered with the request before it)
        "Spell out 58 in English, and then write it in French.": ["num_to_english", "num_to_french"],
    }
    found = seg.segment(sw.router("auto"), sw.engine, list(prompts))
    got = [f.texts for f in found]
    routed = sw.router("auto").route(sw.engine, [t for texts in got for t in texts])
    k = 0
    for (prompt, want), texts in zip(prompts.items(), got):
        if isinstance(want, str):
            assert texts == [], prompt
            continue
        assert [d.adapter for d in routed[k : k + len(texts)]] == want, prompt
        k += len(texts)
    # a part cut because no adapter fits it is the base model's, though the fast head, which routes
    # a part first, reads this one as a task (num_to_french at 0.72)
    joke = "Sort 8, 2, 6 ascending, then tell me a joke about café crème and naïve résumés ☕."
    assert [p["adapter"] for p in sw.route(joke)["parts"]] == ["sort_numbers", None]
    from loraswitch.policy import SamplingParams

    answer = sw.chat([joke], params=SamplingParams(max_new_tokens=24))[0]
    assert [p["adapter"] for p in answer.routing["parts"]] == ["sort_numbers", None]
    assert answer.text.startswith("1. 2, 6, 8\n2. ")
    # a part on the answer before it is answered after it, with that answer written in
    answer = sw.chat(["What is 25 + 17? Then spell the result in English."], params=SamplingParams(max_new_tokens=32))[0]
    assert answer.text == "1. 42\n2. forty-two"
    assert answer.routing["parts"][1]["chained_from"] == 1 and answer.routing["parts"][1]["read"] == "Spell 42 in English."
    # "write it in French" answered with the 58 in sight (alone, num_to_french wrote "quinze")
    answer = sw.chat(["Spell out 58 in English, and then write it in French."], params=SamplingParams(max_new_tokens=32))[0]
    assert answer.text == "1. fifty-eight\n2. cinquante-huit"
    # `loraswitch route` tells which adapter answers each part, as `auto` would
    routed = sw.route("Answer each part.\n1. What is 12 + 30?\n2. Spell out in French: 17")
    assert [p["adapter"] for p in routed["parts"]] == ["add", "num_to_french"] == routed["adapter"]
    assert routed["confidence"] == min(p["confidence"] for p in routed["parts"]) and "adapter" in routed["whole"]
    assert "parts" not in sw.route("Add 45 and 38.") and sw.route("Add 45 and 38.")["adapter"] == "add"
