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
from collections import Counter

from loraswitch.routing.units import ASKING, CONNECTIVES, QUOTED, SUBJECT, Unit, is_statement, split_units

# a word pointing back at the rest of the prompt or at the answer: a request holding one modifies
# its neighbour ("Explain how you did it.", "Show your work.", "Double-check the result.")
_BACK = re.compile(r"\b(?:it|its|this|that|these|those|them|they|their|your|yours|above|previous|same|"
                   r"result|results|answer|answers|each|both|again|too|instead|following|below)\b"
                   # "the" before what the other request reads or writes: "Is the total even?"
                   r"|\bthe\s+(?:[\w'-]+\s+)?(?:total|sum|numbers?|values?|list|output|words?|date|phrase|review|"
                   r"digits?|letters?|steps?|carrying|order|day|year|month|original|input|text|sentence|reasoning|"
                   r"calculation|pronunciation|spelling|median|average|json|sentiment|tone|mood)\b"
                   # a task's question without its data: "Positive or negative?" under a review's line
                   r"|\bpositive\s+or\s+negative\W*$"
                   # the data itself, what was done to it, or a question left without its subject:
                   # "print a dash between numbers", "explain what you did", "which is largest?", "tell me why"
                   r"|\b(?:numbers|digits|values|items|entries)\b|\b(?:what|how)\s+(?:you|changed|happened)\b"
                   r"|\bhow\s+many\s+(?:are|is|there|of)\b|\bwhich\s+(?:one|number|word|item|value|date|is|are|was)\b"
                   r"|\bhow\s+(?:sure|confident|certain)\b"
                   r"|\b(?:why|largest|smallest|biggest|highest|lowest|longest|shortest)\W*$", re.I)
# a pleasantry, not a request: "Thank you so much for the help.", "Have a wonderful day!", a greeting,
# words about the requests rather than one ("Good morning, some quick ones for you."), or a call for
# attention ("Can you help?", "Could you do me a favour?", "Are you there?")
_POLITE = re.compile(r"^\W*(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?"
                     r"(?:help(?:\s+me)?(?:\s+(?:out|with\s+(?:something|this|that|a\s+few\s+things)))?"
                     r"|assist(?:\s+me)?|tell\s+me|do\s+(?:me\s+)?(?:a\s+favou?r|this|that|it))"
                     r"|are\s+you\s+(?:there|sure|certain)|what\s+do\s+you\s+think"
                     r"|is\s+(?:that|it|this)\s+(?:right|correct))\W*$"
                     r"|\b(?:thanks?|thank\s+you|cheers|best\s+wishes|regards|appreciated?|lifesaver|hurry|"
                     r"have\s+a\s+(?:\w+\s+)?(?:day|weekend|evening|night|one))\b"
                     r"|^\W*(?:hi|hello|hey|good\s+(?:morning|afternoon|evening|day)|dear|greetings|howdy)\b"
                     r"|\b(?:some|a\s+few|a\s+couple\s+of|two|three|several)\s+(?:quick\s+|short\s+|more\s+)?"
                     r"(?:ones|things|questions|tasks|requests)\b", re.I)
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
                   r"reverse|round|repeat|redo|fix|correct|shorten|expand|rewrite|rephrase|simplify|lowercase|"
                   r"uppercase|plain|only|no|short|brief|concise|one\s+(?:line|word|sentence|number))\b"
                   r"|\w+\s+(?:by|to|into|from|with|as|in|on)\b)", re.I)
# what leads a request that follows another: a clause separator between them, or a connective
# opening it ("Also, ...", "Then ...", "And ...")
_NEXT = re.compile(rf"[;|/&\uff1b]|\b(?:{CONNECTIVES}|and)\b", re.I)  # units.py cuts at " / ", " & " before a request
# units joined by a dash alone: "\u2014", "\u2013", "\u2015", "--" or a hyphen (units.py cuts at each)
_DASH = re.compile(r"^\W*(?:[\u2014\u2013\u2015]|--?)\W*$")
# how a request opens: a verb of the kind requests start with, or a question word
_ASKING = re.compile(rf"\W*{ASKING}", re.I)
_NEXT_LEAD = re.compile(rf"\W*(?:and\s+)?(?:{CONNECTIVES}|and)\b", re.I)


# the tail of a sentence cut at a dash or a clause separator, not a request: it opens with a
# preposition, a conjunction or a verb's "is" ("... housing \u2013 at least in the US \u2013 is caused by ...")
_FRAGMENT = re.compile(r"\W*(?:at|in|on|for|from|by|with|of|to|as|into|about|after|before|during|since|until|while|"
                       r"because|although|though|unless|or|but|nor|so|yet|is|are|was|were|am|has|have|had)\b", re.I)


def asks_on_its_own(text: str) -> bool:
    """Whether `text` opens as a request (`opens_as_request`) and says what on in its own words:
    no word pointing at the rest of the prompt or an answer ("Translate the following into
    French."), not an instruction on how to answer, not a pleasantry ("Can you help?"). Looser
    than `stands_alone`, which also refuses edits ("Convert ... to JSON."), for a line of its own
    next to a task's line (`switch.segment`)."""
    bare = QUOTED.sub('""', text.strip())
    return (opens_as_request(text) and not _BACK.search(bare) and not says_how(text)
            and _POLITE.search(bare) is None)


def stands_alone(text: str) -> bool:
    """A request complete in itself: 3 to 30 words ("please" aside; two of them words, not
    numbers), not a statement or other sentence opening with its subject, not a pleasantry, no
    word pointing back at the rest of the prompt or the answer, not an instruction about the
    answer's form, an edit, or a verb without its object. What a request no adapter fits must be
    to be answered as a part of its own ("Sort 8, 2, 6, then tell me a joke.") rather than read
    as its neighbour's context ("..., then explain how you did it."): the selector reads both as
    `__none__` (0.99 and 0.996 on the demo router), so the words decide."""
    text = text.strip()
    declarative = ((re.match(SUBJECT, text, re.I) or _NAMED.match(text) or _FRAGMENT.match(text))
                   and not text.endswith("?"))  # "The kettle broke.", "At least in the US"
    words = [w for w in re.findall(r"[\w']+", text) if w.lower() != "please"]
    bare = QUOTED.sub('""', text)  # quoted words are data: "How do you say 'thank you' in Japanese?"
    return (3 <= len(words) <= 30 and sum(w[0].isalpha() for w in words) >= 2 and not is_statement(text)
            and not declarative and not _BACK.search(bare) and not _THE_END.search(bare) and not _FORM.match(bare)
            and not _POLITE.search(bare))


# how to answer, not what: the form, length or checking of the answers ("Keep each answer short.",
# "Answer with just the result.", "Don't add any commentary.", "Only the words, please.")
_HOW = re.compile(r"\W*(?:please\s+)?(?:be|keep|make|use|answers?|reply|respond|format|avoid|don't|do\s+not|no|only|"
                  r"just|without|show|explain|double-check|check|verify|write|give|return|print|list|number|put|"
                  r"separate|include|add|skip|omit|limit|stick|one|lowercase|uppercase|plain|short|brief|"
                  r"(?:numbers?|digits?|words?|text|figures)\s+only)\b", re.I)
_HOW_SHORT = re.compile(r"\W*(?:please\s+)?(?:be|keep|use|no|only|just|don't|do\s+not|avoid|format|plain|lowercase|"
                        r"uppercase|(?:numbers?|digits?|words?|text|figures)\s+only)\b", re.I)  # "Be concise."
_HOW_WORDS = re.compile(r"\b(?:answers?|results?|responses?|repl(?:y|ies)|outputs?|each|all|them|it|words?|"
                        r"commentary|explanations?|steps|work|working|reasoning|lines?|sentences?|numbers?|only|"
                        r"punctuation|lowercase|uppercase|capitals|brief|briefly|short)\b", re.I)


def says_how(text: str) -> bool:
    """Whether `text` says how to answer rather than asking anything (an item of a list of
    requests: "3. Keep each answer short.", "- Answer with just the result, no explanation."):
    at most 15 words, no data of its own (digits, quotes), opening as such instructions do, on
    the answers' form, length or checking (or four words at most opening so: "Be concise.", "Use
    digits."), and not a request complete in itself. It joins the part before it instead of being
    answered as a part by the base model."""
    words = re.findall(r"[\w']+", text)
    return (len(words) <= 15 and not re.search(r"\d", text) and not QUOTED.search(text) and _HOW.match(text) is not None
            and (_HOW_WORDS.search(text) is not None or (len(words) <= 4 and _HOW_SHORT.match(text) is not None))
            and not stands_alone(text))


def without_how(prompt: str) -> str:
    """What routes a prompt answered whole: `prompt` without its lines and list items that say
    how to answer (`says_how`: "1. What is 74 + 26?\n2. Keep the answer short." reads as
    "What is 74 + 26?"). Such a line says nothing of the task, and the selector, trained on
    requests alone, read the two-line prompt as no task's (0.39). Sentences inside a line are
    kept (a review's "Avoid it."); unchanged when nothing, or nothing but such lines, is found."""
    units = split_units(prompt)
    lines = Counter(u.line for u in units)
    how = [u.kind in ("item", "line", "sentence") and lines[u.line] == 1 and not u.example and says_how(u.text)
           for u in units]
    if not any(how) or all(how):
        return prompt
    dropped = {u.line for u, h in zip(units, how) if h}
    return "\n".join(line for k, line in enumerate(prompt.split("\n")) if k not in dropped).strip()


def follows_as_next(prompt: str, before: Unit, unit: Unit) -> bool:
    """Whether `unit` is asked as the next request after `before`: a connective opens it ("Also,
    ...", "Then ...", "And ..."), or a separator joins them in one paragraph ("; ", " | ", ",
    then"), or it is a question after a question on the same line ("What is 9 + 10? Why do cats
    purr?"). A line break alone is not one: on the held-out "paragraphs" layout (a greeting, the
    requests, a thanks) it made a part of a friendly opening line in 5 of 9 prompts (`switch.segment`
    takes such lines only next to a task's). A dash is one before a request ("Sort 17, 4 ascending
    \u2014 what's the capital of Australia?", "Write a poem \u2014 reverse the words: ..."), not
    before an aside ("... on homicides \u2013 since homicides are ...", "Honestly? \u2014 what a
    waste of money.", "... \u2014 asking for a friend.")."""
    if _NEXT_LEAD.match(prompt[unit.start : unit.end]):
        return True
    between = prompt[before.end : unit.start]
    if unit.para != before.para:
        return False
    if _DASH.search(between):
        return opens_as_request(unit.text)
    if _NEXT.search(between):
        return True
    # a question after a question on its line ("What is 9 + 10? Why do cats purr?")
    return (unit.line == before.line and not between.strip() and before.text.rstrip().endswith("?")
            and unit.text.rstrip().endswith("?") and opens_as_request(unit.text))


# what a request names of the one before it: "Write it in French.", "Spell the result in English."
# (not "this" / "these", which mostly bring their own data: "Is this review positive: ...")
_POINTER = re.compile(r"\b(?:it|its|them|they|their|result|results|answer|answers|same|above|previous)\b", re.I)


def opens_as_request(text: str) -> bool:
    """Whether `text` opens as a request does: a verb requests start with, a question word or
    "can you" (`units.ASKING`)."""
    return _ASKING.match(text) is not None


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
_OWN_RESULT = re.compile(r"(?:^\W*|\b(?:and|then)\s+)(?:please\s+)?(?:just\s+)?(?:(?:give|show|tell|send|return|print|"
                         r"write|output)\s+(?:me\s+|us\s+)?(?:only\s+)?|what(?:'s|\s+is|\s+was)\s+)(?:the|your)\s+"
                         r"(?:final\s+)?(?:result|answer|output)s?\W*$", re.I)
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
