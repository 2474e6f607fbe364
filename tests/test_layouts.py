"""Several requests laid out without a numbered list of parts or "then" (`routing.units`,
`routing.requests`, `switch.segment`): dashes, full-width punctuation, "first, ...; second,
...", roman and labelled items, bare lines, and list items that only say how to answer. Pure
text and a keyword stand-in selector on no model; the real default reads a few headline
prompts (`real`; the whole sets are `benchmarks/layouts.py`)."""

from __future__ import annotations

import types

import pytest

from loraswitch.routing.requests import says_how, stands_alone, without_how
from loraswitch.routing.units import split_units
from loraswitch.switch import segment as seg
from loraswitch.switch.segment import Scores

KEYWORDS = {"date": "alpha", "sum": "gamma", "french": "beta"}


def _texts(prompt: str) -> list[str]:
    return [u.text for u in split_units(prompt)]


def _scores(router, engine, texts):
    """A stand-in selector: the adapter of the first keyword in a text, confident when found, else
    `__none__` at 0.99; energy flat (no cut is merged)."""
    adapter = [next((a for k, a in KEYWORDS.items() if k in t.lower()), None) for t in texts]
    return Scores(adapter, [0.99 if a else 0.3 for a in adapter], [0.0] * len(texts),
                  [0.0 if a else 0.99 for a in adapter])


@pytest.fixture
def keyword_selector(monkeypatch):
    monkeypatch.setattr(seg, "score_texts", _scores)
    return types.SimpleNamespace(fast=None)


def _parts(router, prompt: str) -> list[tuple[str, str | None]]:
    return [(p.text, p.adapter) for p in seg.segment(router, None, [prompt])[0].parts]


def test_dashes_full_width_marks_and_joining_words_end_a_unit():
    assert _texts("What is 25 + 17? \u2014 Spell 13 in English.") == ["What is 25 + 17?", "Spell 13 in English."]
    assert _texts("Sort 63, 2, 19 \u2013 reverse the words: a b") == ["Sort 63, 2, 19", "Reverse the words: a b"]
    # a range and a hyphenated word are not separators
    assert _texts("In 2013 \u2013 2014 it rained.") == ["In 2013 \u2013 2014 it rained."]
    assert _texts("A well\u2014known fact.") == ["A well\u2014known fact."]
    # an em dash with no spaces ends a unit only before a request, "then" or "also"
    assert _texts("Sort 9, 4, 7\u2014what is 25 + 17?") == ["Sort 9, 4, 7", "What is 25 + 17?"]
    assert _texts("Spell 58 in English\u2014and also sort 3, 1.") == ["Spell 58 in English", "Sort 3, 1."]
    assert len(split_units("The hotel\u2014cheap as it was\u2014was spotless.")) == 1
    # full-width marks end a sentence with no space after them, and are read as ASCII
    assert _texts("What is 25 + 17\uff1fSpell 13 in English\u3002") == ["What is 25 + 17?", "Spell 13 in English."]
    assert _texts("Sort 9, 4\uff1breverse: a b") == ["Sort 9, 4", "Reverse: a b"]
    assert _texts("Add 3 and 4 as well as spell 13 in English.") == ["Add 3 and 4", "Spell 13 in English."]
    assert _texts("Sort 8, 3 in order plus convert the date.") == ["Sort 8, 3 in order", "Convert the date."]
    assert _texts("Sort 11, 4, 7, plus write 9 in French.") == ["Sort 11, 4, 7", "Write 9 in French."]
    assert _texts("Reverse: a b along with giving the date.") == ["Reverse: a b", "Giving the date."]
    # ... before a request only: a list goes on, and so does a request ("in English, as well as in French")
    assert len(split_units("Sort ascending: 5, 1, 3 as well as 7 and 2.")) == 1
    assert len(split_units("Sort ascending: 5, 1, 3 in addition to 8 and 4.")) == 1
    assert len(split_units("Spell out 48 in English, as well as in French.")) == 1
    assert _texts("What is 230 plus 418?") == ["What is 230 plus 418?"]  # a sum, not two requests
    assert _texts("Is it positive and, in addition, what is 2 + 3?") == ["Is it positive", "What is 2 + 3?"]


def test_ordinal_words_roman_numerals_and_labels_mark_items_in_sequence():
    units = split_units("I need two things: first, add 5 and 2; second, write 9 in French.")
    assert [u.text for u in units] == ["I need two things:", "Add 5 and 2", "Write 9 in French."]
    assert [u.kind for u in units] == ["sentence", "item", "item"] and units[1].ordered
    assert _texts("Two tasks: firstly, sort 5, 1, and secondly, write 40 in French.") == [
        "Two tasks:", "Sort 5, 1", "Write 40 in French."]
    assert _texts("First, sort 5, 1. Second, write 40 in French.") == ["Sort 5, 1.", "Write 40 in French."]
    assert _texts("First: sort 5, 1. Second: write 40 in French.") == ["Sort 5, 1.", "Write 40 in French."]
    # "first" with no "second" is a connective, and ordinals inside a sentence with no lead-in colon are words
    assert _texts("First, sort 5, 1, then write 40 in French.") == ["Sort 5, 1", "Write 40 in French."]
    assert len(split_units("He came first, and I came second in the race.")) == 1
    assert _texts("(i) sort 5, 1 (ii) reverse: a b (iii) add 2 and 3") == ["Sort 5, 1", "Reverse: a b", "Add 2 and 3"]
    for prompt in ("Task 1 - the date\nTask 2 - the sum", "#1 the date\n#2 the sum", "Q1: the date\nQ2: the sum"):
        units = split_units(prompt)
        assert [u.text for u in units] == ["The date", "The sum"] and all(u.ordered for u in units), prompt
    assert not any(u.ordered for u in split_units("- the date\n- the sum"))  # bullets are not a sequence
    units = split_units("Part A: the date\nPart B: the sum")
    assert [u.text for u in units] == ["The date", "The sum"] and all(u.ordered for u in units)
    assert _texts("Task A: the date. Task B: the sum.") == ["The date.", "The sum."]
    assert not split_units("Question: what is 2 + 3?")[0].ordered  # a label without a key
    # a hyphen set off by spaces between words separates too; between numbers it is a minus
    assert _texts("Spell out 12 in English - sort 9, 3, 6") == ["Spell out 12 in English", "Sort 9, 3, 6"]
    assert _texts("What is 5 - 3?") == ["What is 5 - 3?"]


def test_an_item_that_says_how_to_answer_is_not_a_part(keyword_selector):
    assert all(says_how(t) for t in ["Keep each answer short.", "Answer with just the result, no explanation.",
                                     "Don't add any commentary.", "Only the words, please.", "Answer briefly.",
                                     "Answers only, no working.", "Lowercase only, no punctuation."])
    assert not any(says_how(t) for t in ["Tell me a joke.", "Write 21 in French words", "Give me the median.",
                                         "Explain how photosynthesis works.", "Reverse the words in 'a b'."])
    assert _parts(keyword_selector, "1. the date\n2. the sum\n3. Keep each answer short.") == [
        ("The date", "alpha"), ("The sum\nKeep each answer short.", "gamma")]
    assert _parts(keyword_selector, "1) Answer each in one line.\n2) the date\n3) the sum") == [
        ("The date", "alpha"), ("The sum", "gamma")]
    # one request and an instruction: not a list of parts; answered whole, routed on the request
    assert _parts(keyword_selector, "1. the date\n2. Keep the answer short.") == []
    assert without_how("1. What is 74 + 26?\n2. Keep the answer short.") == "1. What is 74 + 26?"
    assert without_how("What is 74 + 26?\nAnswer briefly.") == "What is 74 + 26?"
    # a sentence inside a line is kept (a review's "Avoid it."), and so is a prompt of nothing else
    assert without_how("Positive or negative? It broke. Avoid it.") == "Positive or negative? It broke. Avoid it."
    assert without_how("Answer briefly.") == "Answer briefly."
    # an item no adapter fits that asks something of its own is still a part
    assert _parts(keyword_selector, "1. the date\n2. Tell me a joke about cats.") == [
        ("The date", "alpha"), ("Tell me a joke about cats.", None)]


def test_a_request_no_adapter_fits_on_its_own_line_is_a_part_next_to_a_task(keyword_selector):
    assert _parts(keyword_selector, "Tell me a joke about penguins.\nWhat is the sum of 2 and 3?") == [
        ("Tell me a joke about penguins.", None), ("What is the sum of 2 and 3?", "gamma")]
    assert _parts(keyword_selector, "Hi!\nGive the date.\nRecommend a good sci-fi novel.\nThanks!") == [
        ("Give the date.", "alpha"), ("Recommend a good sci-fi novel.\nThanks!", None)]  # the thanks: context
    assert _parts(keyword_selector, "## A\nGive the date.\n## B\nSuggest a good name for a cat.") == [
        ("Give the date.", "alpha"), ("Suggest a good name for a cat.", None)]
    # greetings and words about the requests are not requests; a line of data is not one either
    assert not stands_alone("Good morning, some quick ones for you.") and not stands_alone("At least in the US")
    assert _parts(keyword_selector, "Good morning, some quick ones for you.\nGive the date.") == []
    assert _parts(keyword_selector, "Reverse the words of the date:\nsmall birds sing at dawn.") == []
    assert _parts(keyword_selector, "Give the date.\n'Tell me a joke about cats.'") == []
    # a dash makes the next request only next to a question: in running prose it is an aside
    from loraswitch.routing.requests import follows_as_next

    for prompt, asked in [("Sort 17, 4 ascending \u2014 what's the capital of Australia?", True),
                          ("What is 2 + 3? \u2014 Tell me a joke.", True),
                          ("Write a short poem \u2014 reverse the words: a b", True),
                          ("Sort 9, 4 -- tell me a joke about cats.", True),  # "--", "\u2015", " - ": as "\u2014"
                          ("Sort 9, 4 \u2015 what is 2 + 3?", True),
                          ("Write 21 in French - what is the capital of Peru?", True),
                          ("Sort 9, 4\u2014what is 2 + 3?", True),
                          ("Studies focus on homicides \u2013 since homicides are defined alike.", False)]:
        u = split_units(prompt)
        assert len(u) == 2 and follows_as_next(prompt, u[0], u[1]) == asked, prompt
    for aside in ("The blender \u2014 which I bought in May \u2014 broke.", "Great food - when we got there it was warm."):
        u = split_units(aside)  # a question word before "I", "we", ...: a relative clause, not a request
        assert not any(follows_as_next(aside, a, b) for a, b in zip(u, u[1:])), aside
    # a question whose line goes on with a statement has its input there: read together, not cut off
    assert _parts(keyword_selector, "Give the date \u2013 Positive or negative? The lamp stopped working.") == []
    # two lines no adapter fits: no task line next to them, nothing is cut
    assert _parts(keyword_selector, "Explain recursion.\nGive an example in Python.") == []


def test_a_unit_without_a_word_is_data_never_a_part(keyword_selector, monkeypatch):
    def scores(router, engine, texts):  # a selector that reads the bare numbers as a sum
        out = _scores(router, engine, texts)
        return Scores([a or ("gamma" if not any(c.isalpha() for c in t) else None) for a, t in zip(out.adapter, texts)],
                      [0.99 if not any(c.isalpha() for c in t) else c for c, t in zip(out.confidence, texts)],
                      out.energy, out.none)

    monkeypatch.setattr(seg, "score_texts", scores)
    assert _parts(keyword_selector, "Give the date, lowest first: 14\uff1b3\uff1b77") == []


@pytest.mark.real
def test_the_real_selector_finds_parts_in_these_layouts():
    from loraswitch.switch import Switch

    sw = Switch()
    prompts = {
        "What is 25 + 17? \u2014 Spell out 13 in English.": ["add", "num_to_english"],
        "What is 25 + 17\uff1fSpell out 13 in English\u3002": ["add", "num_to_english"],
        "I need two things: first, add 543 and 218; second, write the number 90 in French.": ["add", "num_to_french"],
        "1. Add 73 and 148.\n2. Convert 25 December 2012 to ISO 8601.\n3. Keep each answer short.": ["add", "iso_date"],
        "Tell me a joke about penguins.\nWhat is 620 + 37?": [None, "add"],
        "Sort, lowest first: 14\uff1b3\uff1b77\uff1b50": [],
        "Here's a date \u2014 12 August 1976 \u2014 please give it in ISO 8601 form.": [],
        "Reverse the word order of this sentence:\nsmall birds sing at dawn": [],
    }
    found = seg.segment(sw.router("auto"), sw.engine, list(prompts))
    assert [[p.adapter for p in f.parts] for f in found] == list(prompts.values())
    # one request and an instruction on its own line: routed on the request
    routed = sw.router("auto").route(sw.engine, ["1. What is 25 + 17?\n2. Keep the answer short."])
    assert routed[0].adapter == "add"


def test_what_a_black_box_review_found(keyword_selector):
    """Found by a review of about 450 messages through the library, the CLI and the server."""
    from loraswitch.routing.requests import names_result

    # one request cut in two: short how-to items, calls for attention, asides after a dash
    assert all(says_how(t) for t in ["Be concise.", "Use digits.", "Numbers only.", "Don't explain.", "One line only."])
    assert not says_how("Give me the median.")
    assert not any(stands_alone(t) for t in ["Can you help?", "Could you do me a favour?", "Are you there?"])
    assert _parts(keyword_selector, "Can you help?\nGive the date.") == []
    assert _parts(keyword_selector, "Give the date? \u2014 asking for a friend.") == []
    assert _parts(keyword_selector, "Give the date. Honestly? \u2014 what a waste of money.") == []
    assert not names_result("What's the result?")  # asks for the answer: nothing to do on it
    # the line under a request ending with a colon is its input, however confidently read
    assert _parts(keyword_selector, "Give the date of this:\nWhat is the sum of 2 and 3?") == []
    # "plus" between numbers is no request's word: "1 plus 4" cut at semicolons is data
    assert _parts(keyword_selector, "Give the date: 3; 9; 1 plus 4; 2") == []
    # list markers: roman numerals on lines, a byte-order mark, "#1:", "and finally" closing ordinals
    assert _texts("(i) the date\n(ii) Tell me a joke\n(iii) the sum") == ["The date", "Tell me a joke", "The sum"]
    assert _texts("i. the date\nii. the sum") == ["The date", "The sum"]
    assert _texts("\ufeff1. the date\n2. the sum") == ["The date", "The sum"]
    assert _texts("#1: the date\n#2: the sum") == ["The date", "The sum"]
    # found in a third blind set: labels inline, "plus" after a number, help "with something"
    assert _texts("Q1: the date. Q2: the sum.") == ["The date.", "The sum."]
    assert _texts("Sort 19, 5, 33 plus tell me a joke.") == ["Sort 19, 5, 33", "Tell me a joke."]
    assert not stands_alone("Can you help me with something?")

    assert _texts("Do these: first, the date; second, the sum; and finally, a joke.") == [
        "Do these:", "The date", "The sum", "A joke."]
    assert not any(u.kind == "item" for u in split_units("First, the date; the sum. Next, a b, and finally a joke."))
    # two whole lines of one task, each a request of its own, are two parts ("Spell out 5 in
    # English.\nSpell out 6 in English." was one, answered "fifty"); other units of one task stay one
    assert _parts(keyword_selector, "Give the date of May 5.\nGive the date of June 6.") == [
        ("Give the date of May 5.", "alpha"), ("Give the date of June 6.", "alpha")]
    assert _parts(keyword_selector, "Give the date of May 5.\nGive it as a date, please.") == []  # "it": one
    assert _parts(keyword_selector, "Give the date of May 5. Give the date of June 6.") == []  # one line
    # the next item of any list, labelled, bulleted or ordinal, that names the answer is chained
    for prompt in ("- the date\n- Spell the result in French.", "Q1: the date\nQ2: Spell the result in French.",
                   "First, the date? Second, spell the result in French."):
        found = seg.segment(keyword_selector, None, [prompt])[0]
        assert [p.after for p in found.parts] == [None, 0], prompt


def test_found_parts_beyond_the_limit_are_answered_whole_and_say_why(tiny_base):
    """A labelled list of more parts than `max_parts` is answered whole, like a numbered one, and
    says so (a review found it answered whole with `not_split` empty)."""
    from loraswitch.switch.found import Part, Segmentation
    from loraswitch.switch.parts import PartsError, fan_out
    from loraswitch.switch.request import Request

    found = Segmentation([Part([k], True, None, 1.0, text=f"Q{k}", kind="item") for k in range(5)], [])
    with pytest.raises(PartsError, match="has 5 parts; at most 3") as exc:
        fan_out(Request.chat("Q1: a\nQ2: b"), tiny_base, max_parts=3, found=found)
    assert exc.value.code == "too_many_parts"
    with pytest.raises(PartsError, match="too small for 5 parts"):
        fan_out(Request.chat("Q1: a\nQ2: b", max_tokens=6), tiny_base, found=found)


def test_what_a_second_review_found(keyword_selector):
    """Found by a second review (164 one-request and 30 multi-request messages, routing only)."""
    # a request on a line of its own next to task lines is not dropped as an instruction, whatever
    # the selector reads in it (here nothing: the base model answers it)
    assert _parts(keyword_selector, "Hey!\nConvert title=Dune, year=1965 to JSON.\nGive the date.\nThanks!") == [
        ("Convert title=Dune, year=1965 to JSON.", None), ("Give the date.\nThanks!", "alpha")]
    # ... but a lead-in pointing at the rest is not one
    assert _parts(keyword_selector, "Translate the following into Spanish.\nGive the date.") == []
    # a line going on from a sentence cut mid-list, a check on the answer, a task's question without its data
    assert _parts(keyword_selector, "Could you give the date 5, 17, 3,\n11 and the sum of 8?") == []
    assert not stands_alone("Are you sure?") and not stands_alone("Is that right?")
    assert _parts(keyword_selector, "Give the date.\nAre you sure?") == []
    assert not stands_alone("Positive or negative?") and not stands_alone("What's the sentiment?")
    # ", and" before a question starts one
    assert _texts("Convert the date, and what is the sum of 2 and 3?") == ["Convert the date", "What is the sum of 2 and 3?"]


def test_what_a_fourth_blind_set_found(keyword_selector):
    """Found by `benchmarks/layouts_heldout4.json` (written blind: texting style, P.S. lines,
    slashes, keycap emoji, Q/A forms to fill)."""
    from loraswitch.routing.requests import follows_as_next

    # " / " and " & " before a request separate requests; elsewhere they are data
    assert _texts("add 1 and 4 / what's 73 in French / is 'it broke' positive?") == [
        "Add 1 and 4", "What's 73 in French", "Is 'it broke' positive?"]
    assert _texts("Spell 33 in French & spell 33 in English") == ["Spell 33 in French", "Spell 33 in English"]
    for data in ("Tom & Jerry is a show.", "The ratio 3 / 4 is small.", "Is it yes / no?", "Convert 7/14/2019."):
        assert _texts(data) == [data]
    # "btw", "oh and", "P.S." / "PS:" / "P.P.S." lead the next request, and are not part of it
    prompt = "sort 5 82 3 for me btw what year did the wall fall"
    units = split_units(prompt)
    assert [u.text for u in units] == ["Sort 5 82 3 for me", "What year did the wall fall"]
    assert follows_as_next(prompt, *units)
    prompt = "Give the date.\nP.S. what's 12+12\nP.P.S. how many ounces in a pound?"
    units = split_units(prompt)
    assert [u.text for u in units] == ["Give the date.", "What's 12+12", "How many ounces in a pound?"]
    assert all(follows_as_next(prompt, a, b) for a, b in zip(units, units[1:]))
    assert _texts("yo add 14 and 9 oh and whats 61 in french") == ["Yo add 14 and 9", "Whats 61 in french"]
    # keycap emoji number items; empty "A:" lines are blanks to fill, not worked examples
    assert _texts("1\ufe0f\u20e3 the date\n2\ufe0f\u20e3 the sum") == ["The date", "The sum"]
    assert not any(u.example for u in split_units("Q: the date?\nA:\nQ: the sum?\nA:"))
    assert all(u.example for u in split_units("Q: the date?\nA: May 5")[:2])
    # a question after a question on its line is the next request; a statement after one is its input
    prompt = "What is the sum of 9 and 10? Why do cats purr?"
    assert follows_as_next(prompt, *split_units(prompt))
    assert _parts(keyword_selector, prompt) == [("What is the sum of 9 and 10?", "gamma"), ("Why do cats purr?", None)]
    prompt = "Give the date of May 5? The shop was closed."
    assert not follows_as_next(prompt, *split_units(prompt))
    # a list item that asks on its own, in a list with an item read as a task, is a part
    assert _parts(keyword_selector, "\u2013 What is the sum of 7 and 8?\n\u2013 What does 'ubiquitous' mean?") == [
        ("What is the sum of 7 and 8?", "gamma"), ("What does 'ubiquitous' mean?", None)]
    assert _parts(keyword_selector, "- Tell me a joke\n- Write a poem about May") == []  # no task beside them
    assert _parts(keyword_selector, "Give the date of these:\n- May 5\n- June 6") == []  # data items
    # a line typed without an end mark that opens as a request is a line of its own
    assert _parts(keyword_selector, "What is the sum of 2 and 3\nGive the date of May 5\nWhat's the tallest mountain") == [
        ("What is the sum of 2 and 3", "gamma"), ("Give the date of May 5", "alpha"), ("What's the tallest mountain", None)]


def test_a_unit_the_main_head_leaves_takes_the_fast_heads_confident_pick(monkeypatch):
    """Whole prompts are routed by the fast head first; units the main head sends to no adapter
    take the fast head's pick when it is confident (>= 0.9), and never once the library grew."""
    from loraswitch.routing import features
    from loraswitch.routing.base import Decision

    picks = [Decision("alpha", 0.95, {}), Decision("beta", 0.6, {}), Decision(None, 0.99, {})]
    fast = types.SimpleNamespace(layer=5, route_features=lambda engine, feats: picks[: len(feats)])
    monkeypatch.setattr(features, "prompt_features", lambda engine, texts, layer: list(texts))
    inner = types.SimpleNamespace(fast=fast, added={})
    main = [Decision(None, 0.9, {}), Decision(None, 0.9, {}), Decision(None, 0.9, {}), Decision("gamma", 0.99, {})]
    got = seg._fast_picks(inner, None, ["a", "b", "c", "d"], main)
    assert {i: d.adapter for i, d in got.items()} == {0: "alpha"}  # confident only; "d" was the main head's
    assert seg._fast_picks(types.SimpleNamespace(fast=fast, added={"new": object()}), None, ["a"], main[:1]) == {}


def test_questions_making_up_a_line_are_parts_even_of_one_task(keyword_selector):
    """From a fifth blind set: "What's 11 + 22? What's 33 + 44?" was answered as one part. A line
    of questions and nothing else, each opening as a request, is one part per question, as two
    whole lines of one task are; a question with a modifier or its data on the line is not cut."""
    from loraswitch.switch.planning import question_lines

    prompt = "What is the sum of 1 and 2? What is the sum of 3 and 4?"
    assert question_lines(split_units(prompt)) == {0}
    assert _parts(keyword_selector, prompt) == [("What is the sum of 1 and 2?", "gamma"),
                                                ("What is the sum of 3 and 4?", "gamma")]
    for one in ("What is the sum of 1 and 2? Please.", "Give the date? Or the day? For May 5."):
        assert not question_lines(split_units(one)) and _parts(keyword_selector, one) == [], one


def test_spelled_label_numbers_numeric_ordinals_and_repeated_bare_labels_mark_items():
    """From the fifth blind set's misses: "Task one: ...\\nTask two: ...", "1st ..., 2nd ...,
    3rd ...", "Q: ... Q: ..." on one line. Dates stay words ("1st of May, 2nd of June")."""
    units = split_units("Task one: reverse 'a b'.\nTask two: what is the sum of 2 and 2?")
    assert [u.text for u in units] == ["Reverse 'a b'.", "What is the sum of 2 and 2?"] and all(u.ordered for u in units)
    assert _texts("Need 3 things: 1st reverse 'a b', 2nd the sum of 5 and 5, 3rd the date") == [
        "Need 3 things:", "Reverse 'a b'", "The sum of 5 and 5", "The date"]
    assert _texts("Q: what is the sum of 2 and 3? Q: is the date late?") == [
        "What is the sum of 2 and 3?", "Is the date late?"]
    for words in ("Dates: 1st of May, 2nd of June.", "Meetings: 1st March, 2nd April.", "Part two of the book is long."):
        assert len(split_units(words)) == 1, words
