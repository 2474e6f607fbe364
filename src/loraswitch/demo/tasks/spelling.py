"""Number spelling in English (0-999) and French (0-99), the ground truth of two demo tasks.

French follows the traditional (pre-1990) rules the spec's example uses: hyphens inside tens,
"et" before "un"/"onze" in 21-71, "quatre-vingts" with its plural s only when nothing follows.
"""

from __future__ import annotations

_EN_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_EN_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

_FR_ONES = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze", "treize", "quatorze", "quinze", "seize", "dix-sept", "dix-huit", "dix-neuf"]
_FR_TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante"}


def english(n: int) -> str:
    """Spell 0 <= n <= 999 in English without "and": 347 -> "three hundred forty-seven"."""
    if not 0 <= n <= 999:
        raise ValueError(f"english() takes 0..999, got {n}")
    if n < 20:
        return _EN_ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _EN_TENS[tens] + (f"-{_EN_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    head = f"{_EN_ONES[hundreds]} hundred"
    return head if rest == 0 else f"{head} {english(rest)}"


def french(n: int) -> str:
    """Spell 0 <= n <= 99 in French: 21 -> "vingt et un", 80 -> "quatre-vingts"."""
    if not 0 <= n <= 99:
        raise ValueError(f"french() takes 0..99, got {n}")
    if n < 20:
        return _FR_ONES[n]
    tens, ones = divmod(n, 10)
    if tens in (7, 9):  # soixante-dix.., quatre-vingt-dix..: base 60/80 plus 10..19
        base = "soixante" if tens == 7 else "quatre-vingt"
        rest = 10 + ones
        if tens == 7 and ones == 1:
            return "soixante et onze"
        return f"{base}-{_FR_ONES[rest]}"
    if tens == 8:
        return "quatre-vingts" if ones == 0 else f"quatre-vingt-{_FR_ONES[ones]}"
    word = _FR_TENS[tens]
    if ones == 0:
        return word
    if ones == 1:
        return f"{word} et un"
    return f"{word}-{_FR_ONES[ones]}"
