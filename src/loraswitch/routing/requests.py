"""Whether a unit is a request of its own, by its words: what `switch.segment` asks of a unit
the selector reads as `__none__` before answering it as a part of its own (by the base model)
instead of as its neighbour's context. The selector cannot tell "Sort 8, 2, 6, then tell me a
joke." from "Sort 8, 2, 6, then explain how you did it." (both halves read `__none__` at 0.99 or
more on the demo router), so the words decide: `follows_as_next` (a connective or separator
makes it the next request) and `stands_alone` (nothing in it points back at the other request
or its answer). Plain text, no model (docs/routing.md has what these rules miss).
"""

from __future__ import annotations

import re

from loraswitch.routing.units import CONNECTIVES, QUOTED, SUBJECT, Unit, is_statement

# a word pointing back at the rest of the prompt or at the answer: a request holding one modifies
# its neighbour ("Explain how you did it.", "Show your work.", "Double-check the result.")
_BACK = re.compile(r"\b(?:it|its|this|that|these|those|them|they|their|your|yours|above|previous|same|"
                   r"result|results|answer|answers|each|both|again|too|instead|following|below)\b"
                   # "the" before what the other request reads or writes: "Is the total even?"
                   r"|\bthe\s+(?:[\w'-]+\s+)?(?:total|sum|numbers?|values?|list|output|words?|date|phrase|review|"
                   r"digits?|letters?|steps?|carrying|order|day|year|month|original|input|text|sentence|reasoning|"
                   r"calculation|pronunciation|spelling|median|average|json)\b"
                   # the data itself, what was done to it, or a question left without its subject:
                   # "print a dash between numbers", "explain what you did", "which is largest?", "tell me why"
                   r"|\b(?:numbers|digits|values|items|entries)\b|\b(?:what|how)\s+(?:you|changed|happened)\b"
                   r"|\bhow\s+many\s+(?:are|is|there|of)\b|\bwhich\s+(?:one|number|word|item|value|date|is|are|was)\b"
                   r"|\bhow\s+(?:sure|confident|certain)\b"
                   r"|\b(?:why|largest|smallest|biggest|highest|lowest|longest|shortest)\W*$", re.I)
# a pleasantry, not a request: "Thank you so much for the help.", "Have a wonderful day!"
_POLITE = re.compile(r"\b(?:thanks?|thank\s+you|cheers|best\s+wishes|regards|appreciated?|lifesaver|hurry|"
                     r"have\s+a\s+(?:\w+\s+)?(?:day|weekend|evening|night|one))\b", re.I)
# a sentence opening with a name and a verb: "John is waiting downstairs.", "Paris is lovely in spring."
_NAMED = re.compile(r"[A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)*\s+(?:is|are|was|were|has|have|had|will|seems?|looks?)\b")
# a verb and "the" one common noun, nothing more: what it names is elsewhere ("Show the steps.",
# "Give me the median."), where a request of its own says which ("the capital of Japan", "the
# water cycle", "the Eiffel Tower")
_THE_END = re.compile(r"^(?:[Pp]lease\s+)?[\w'-]+\s+(?:me\s+)?the\s+[a-z][\w'-]*\s*[.!]*$")
# an instruction about the answer's form ("Be brief.", "Answer in one word.", "Reply in French."),
# an edit of what the request before it produces ("Add a field for city.", "Translate that too."),
# or a verb whose object is left out ("..., then multiply by 2.")
_FORM = re.compile(r"(?:please\s+)?(?:(?:be|keep|make|use|answer|reply|respond|format|avoid|don't|do\s+not|add|remove|"
                   r"delete|change|replace|include|append|insert|drop|rename|capitalize|convert|translate|sort|"
                   r"reverse|round|repeat|redo|fix|correct|shorten|expand|rewrite|rephrase|simplify)\b"
                   r"|\w+\s+(?:by|to|into|from|with|as|in|on)\b)", re.I)
# what leads a request that follows another: a clause separator between them, or a connective
# opening it ("Also, ...", "Then ...", "And ...")
_NEXT = re.compile(rf"[;|]|\b(?:{CONNECTIVES}|and)\b", re.I)
_NEXT_LEAD = re.compile(rf"\W*(?:and\s+)?(?:{CONNECTIVES}|and)\b", re.I)


def stands_alone(text: str) -> bool:
    """A request complete in itself: 3 to 30 words ("please" aside; two of them words, not
    numbers), not a statement or other sentence opening with its subject, not a pleasantry, no
    word pointing back at the rest of the prompt or the answer, not an instruction about the
    answer's form, an edit, or a verb without its object. What a request no adapter fits must be
    to be answered as a part of its own ("Sort 8, 2, 6, then tell me a joke.") rather than read
    as its neighbour's context ("..., then explain how you did it."): the selector reads both as
    `__none__` (0.99 and 0.996 on the demo router), so the words decide."""
    text = text.strip()
    declarative = (re.match(SUBJECT, text, re.I) or _NAMED.match(text)) and not text.endswith("?")  # "The kettle broke."
    words = [w for w in re.findall(r"[\w']+", text) if w.lower() != "please"]
    bare = QUOTED.sub('""', text)  # quoted words are data: "How do you say 'thank you' in Japanese?"
    return (3 <= len(words) <= 30 and sum(w[0].isalpha() for w in words) >= 2 and not is_statement(text)
            and not declarative and not _BACK.search(bare) and not _THE_END.search(bare) and not _FORM.match(bare)
            and not _POLITE.search(bare))


def follows_as_next(prompt: str, before: Unit, unit: Unit) -> bool:
    """Whether `unit` is asked as the next request after `before`: a connective opens it ("Also,
    ...", "Then ...", "And ..."), or a separator joins them in one paragraph ("; ", " | ", ",
    then"). A line break alone is not one: on the held-out "paragraphs" layout (a greeting, the
    requests, a thanks) it made a part of a friendly opening line in 5 of 9 prompts."""
    if _NEXT_LEAD.match(prompt[unit.start : unit.end]):
        return True
    return unit.para == before.para and _NEXT.search(prompt[before.end : unit.start]) is not None


# what a request names of the one before it: "Write it in French.", "Spell the result in English."
# (not "this" / "these", which mostly bring their own data: "Is this review positive: ...")
_POINTER = re.compile(r"\b(?:it|its|them|they|their|result|results|answer|answers|same|above|previous)\b", re.I)


def points_back(text: str) -> bool:
    """Whether the request `text` names something of the one before it: a part opening so is
    answered with the prompt from that request on (`switch.segment.finish`), though routed by its
    own words."""
    return _POINTER.search(QUOTED.sub('""', text)) is not None


# what names the answer of the request before it, not its input: "Spell the result in English.",
# "Write the answer in French.", "Write that number in French." ("the result of 4 + 5" brings its
# own data; "the sum" and "the total" are what the `add` task's own requests ask for: "Find the
# total: 3 + 4")
_RESULT = re.compile(r"\b(?:the|that|this|your|its)\s+(?:(?:final|last|previous|first)\s+)?"
                     r"(?:result|answer|output|outcome)(?!\s+(?:of|to|for)\b)\b|\bwhat\s+you\s+(?:got|get|found)\b"
                     # what it wrote, named by its kind: "Write that number in French.", "Reverse the sorted list."
                     r"|\bthat\s+(?:number|sum|total|list|date|value|sentence|phrase|text)\b"
                     r"|\bthe\s+(?:sorted|reversed|resulting|converted|computed)\s+"
                     r"(?:list|numbers?|words?|date|sum|total|text|value|phrase)\b", re.I)
# ... unless it only asks for an answer, its own or the one before ("Sort 30, 10, 20 and give me
# the result.", "Sort 9, 4, 7. Show me the result."): nothing to do on it, a modifier
_OWN_RESULT = re.compile(r"(?:^\W*|\b(?:and|then)\s+)(?:please\s+)?(?:just\s+)?(?:give|show|tell|send|return|print|"
                         r"write|output)\s+(?:me\s+|us\s+)?(?:only\s+)?(?:the|your)\s+(?:final\s+)?"
                         r"(?:result|answer|output)s?\W*$", re.I)
# ... and not one about the form, length or checking of that answer, which is the same answer
# asked differently ("Then keep the answer short.", "Then format the result as JSON.", "Then
# double-check the answer."): a modifier of its request, not a request on its answer
_SAME_ANSWER = re.compile(r"\b(?:only|just|short|shorter|brief|briefly|concise|digits?|numerals?|one\s+(?:line|word|"
                          r"sentence|number)|single\s+(?:line|word|number)|plain\s+text|bold|italics?|brackets|"
                          r"parenthes[ie]s|quotes|comma[- ]?separated|separated|lowercase|uppercase|json|markdown|"
                          r"correct|right|sure|exact|exactly|precise|check|double-check|verify|confirm|explain|"
                          r"justify|reason|why|how|round|rounded|twice|again|below|above|format|formatted|"
                          r"keep|make|don't|do\s+not|without|no\s+words|if\s+needed|before)\b", re.I)
_INLINE_MAX = 80  # characters of an answer written into the next request's sentence; longer: set below it


def works_on(prompt: str, before: Unit, unit: Unit) -> bool:
    """Whether `unit` works on the answer of the request in `before` (a part of its own, answered
    after that one): it names an answer (`names_result`) and is asked as the next request (a
    connective or separator, `follows_as_next`). Right after it without one is not enough: "What
    is 25 + 17? Keep the answer short." is one request, and so are most such pairs."""
    return names_result(prompt[unit.start : unit.end]) and follows_as_next(prompt, before, unit)


def names_result(text: str) -> bool:
    """Whether the request `text` works on the answer of the one before it ("Then spell the
    result in English."): such a part is answered after that one, with its answer written in
    (`with_result`), rather than side by side with the prompt in sight (`points_back`)."""
    bare = QUOTED.sub('""', text)
    lead = _NEXT_LEAD.sub("", text, count=1).strip(" ,")  # "Then the answer must ..." opens with its subject
    declarative = re.match(SUBJECT, lead, re.I) is not None and not text.rstrip().endswith("?")
    return (_RESULT.search(bare) is not None and not _OWN_RESULT.search(bare) and not _SAME_ANSWER.search(bare)
            and not is_statement(text) and not declarative)


def with_result(text: str, result: str) -> str:
    """`text` with the words naming the answer before it replaced by that answer: "Spell the
    result in English." and "42" give "Spell 42 in English." (an adapter trained on single
    requests reads a request like its own); an answer of several lines or over _INLINE_MAX
    characters is named "the text below" and set under the request. Unchanged when nothing in
    it names a result, or the answer is empty."""
    result = result.strip()
    bare = QUOTED.sub(lambda m: "\0" * len(m.group()), text)  # positions kept; quoted words are data
    found = _RESULT.search(bare)
    if found is None or not result:
        return text
    inline = "\n" not in result and len(result) <= _INLINE_MAX
    put = result.rstrip(".!") if inline else "the text below"
    out = text[: found.start()] + put + text[found.end():]
    return out if inline else f"{out}\n\n{result}"
