"""Official answer matching of MMBench / ScienceQA and MMMU, and MMBench CircularEval."""

from __future__ import annotations

import random
import re
from collections.abc import Hashable, Mapping, Sequence

from lvlm_jax.evals.metrics_vqa import _LETTERS

# ---------------------------------------------------------------------------------------------
# MMBench / ScienceQA: VLMEvalKit vlmeval/utils/matching_util.py `can_infer`
# ---------------------------------------------------------------------------------------------

# can_infer_option blanks these before splitting into words (not quotes, unlike
# metrics_vqa._MARKS, so "'B'" stays one word and is not a letter).
_OPTION_MARKS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
# VLMEvalKit's `_VERBOSE_ANSWER_RE`, verbatim: (?i) makes the letter case-insensitive too, and
# only A-D are looked for.
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_REFUSED = "Z"  # VLMEvalKit's label for "the model declined to answer"


def _infer_option(response: str, letters: str) -> str | None:
    """can_infer_option: a letter, "Z" for a refusal, None to fall through to the text step."""
    if "Failed to obtain answer via API" in response:
        return None
    if any(refusal in response for refusal in _REFUSALS):
        return _REFUSED
    words = response.translate(_OPTION_MARKS).split()
    named = [c for c in letters if c in words]
    if len(named) == 1:
        # The one letter counts only among the last five words ("B is wrong, as the chart
        # shows ..." names no answer): `splits.index(ch) > len(splits) - 5`.
        if words.index(named[0]) > len(words) - 5:
            return named[0]
    elif not named and _REFUSED in words:
        return _REFUSED
    match = _VERBOSE_ANSWER.search(response)
    if match and match.group(1).upper() in letters:
        return match.group(1).upper()
    return None


def _infer_text(response: str, options: Sequence[str]) -> int | None:
    """can_infer_text: the one option whose text is inside a reply of bounded length."""
    reply = response.lower()
    # A long explanation mentions several options in passing; VLMEvalKit gives up past 2x.
    if len(reply) > 2 * sum(len(o) for o in options):
        return None
    hits = [i for i, o in enumerate(options) if o.lower() in reply]
    return hits[0] if len(hits) == 1 else None


def parse_choice(response: str, options: Sequence[str]) -> int | None:
    """Index of the option a reply picks, by VLMEvalKit's `can_infer` (MMBench, ScienceQA).

    First the option letter (A, B, C, ... for `options` in order): after blanking
    `.()[],:;!*#{}`, exactly one valid letter must stand as a word, within the last five words
    ("B", "B.", "(B)", "B)", "The answer is B"); else "answer is X" / "correct answer is **X**"
    for X in A-D, in either case (so "the answer is a dog" reads as A, as upstream). A known
    refusal phrase, or a lone "Z" with no letter, means no answer (None). Failing that, the text
    of exactly one option must appear in the lower-cased reply, and the reply must be at most
    twice as long as all option texts together. None when nothing (or more than one) is found.

    `multiple_choice_by_letter` in metrics_vqa is a looser heuristic for free-form replies;
    this function reproduces the official matcher and nothing more.
    """
    letters = _LETTERS[: len(options)]
    letter = _infer_option(str(response), letters)
    if letter is not None:
        return letters.index(letter) if letter in letters else None
    return _infer_text(str(response), options)


# ---------------------------------------------------------------------------------------------
# MMMU: MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py (same rules in lmms-eval tasks/mmmu)
# ---------------------------------------------------------------------------------------------

_MMMU_EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'")


def mmmu_parse_choice(response: str, options: Sequence[str], seed: str = "") -> int:
    """Index of the option a reply picks, by MMMU's `parse_multi_choice_response`.

    The reply loses leading/trailing `,.!?;:'` (one mark after the other, in that order) and is
    padded with a space each side. Candidates are the letters written "(A)"; if none, letters
    standing between spaces (" A "); if none and the reply has more than five words, options
    whose text appears in it (case-insensitive). Of several candidates the one whose last
    occurrence is latest wins, so "The answer is B because A is wrong" gives A.

    With no candidate the official script returns `random.choice` of the letters from a
    process-wide generator seeded 42 once, so its pick depends on the order of the questions.
    Here the draw comes from `random.Random(seed)`: pass the question id as `seed` and the same
    question always gets the same (valid) index, in any order.
    """
    if not options:
        raise ValueError("mmmu_parse_choice needs at least one option")
    letters = _LETTERS[: len(options)]
    for mark in _MMMU_EDGE_MARKS:
        response = response.strip(mark)
    text = f" {response} "  # the padding lets " A " match a letter at either end
    patterns = [f"({c})" for c in letters]
    found = [i for i, p in enumerate(patterns) if p in text]
    if not found:
        patterns = [f" {c} " for c in letters]
        found = [i for i, p in enumerate(patterns) if p in text]
    if not found and len(text.split()) > 5:
        text = text.lower()  # option texts are matched case-insensitively
        patterns = [o.lower() for o in options]
        found = [i for i, p in enumerate(patterns) if p in text]
    if not found:
        return random.Random(seed).randrange(len(options))
    # np.argmax over rfind positions: the latest last occurrence, the first option on a tie.
    return max(found, key=lambda i: text.rfind(patterns[i]))


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL_KEYS = frozenset(":,.!?;'")
# extract_numbers' three patterns, verbatim, so the same substrings come out.
_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # 1,000 / -12,345,678
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # 1.5e-3
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # 12 / 3.5 / .5
)


def _key_subresponses(response: str) -> list[str]:
    """The shortest tail after an indicator ("is ", "so ", ..., "=" in the last line), per line."""
    text = response.strip().strip(".").lower()
    # Upstream splits on r"\.\s(?=[A-Z])|\n" *after* lower-casing, so only newlines ever split.
    lines = text.split("\n")
    keys = []
    for k, line in enumerate(lines):
        indicators = _KEY_INDICATORS + ("=",) if k == len(lines) - 1 else _KEY_INDICATORS
        shortest = None
        for indicator in indicators:
            if indicator in line:
                tail = line.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_KEYS:
            keys.append(shortest)
    return keys or [text]


def _normalize_open(text: str) -> list[float | str]:
    """normalize_str: a number (commas dropped) rounded to 2 decimals, else the lower-cased text;
    one character becomes " x" and "x " so it is not found inside any word."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def mmmu_open_correct(response: str, answers: str | Sequence[str]) -> bool:
    """Whether a reply to an MMMU open question is right: `parse_open_response` then `eval_open`.

    The reply yields its key sub-responses (see `_key_subresponses`) and every number in them,
    each normalised: numeric strings become floats rounded to 2 decimals after removing every
    comma ("1,000" -> 1000.0, but also "1,2" -> 12.0), other text is lower-cased ("5%" stays
    the string "5%", while its extracted "5" is 5.0). A gold answer, normalised the same way,
    matches when it equals a numeric prediction, or when a string gold is a substring of a
    string prediction (so "cat" is found in "the cat sat"); a numeric gold never matches text.
    A list of golds is right when any matches. Quirks kept: "1,000" in a reply also yields the
    number 0.0 (the simple-number regex reads the "000"), so a gold "0" counts as found; and a
    one-character gold like "a" is looked for as " a" or "a ", so it is found in "a dog" but
    not inside "cat".
    """
    golds = [answers] if isinstance(answers, str) else list(answers)
    norm_golds = [g for answer in golds for g in _normalize_open(answer)]
    keys = _key_subresponses(response)
    pieces = keys + [
        n for key in keys for pattern in _NUMBER_PATTERNS for n in pattern.findall(key)
    ]
    for pred in (p for piece in pieces for p in _normalize_open(piece)):
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in norm_golds):
                return True
        elif pred in norm_golds:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# MMBench CircularEval
# ---------------------------------------------------------------------------------------------


def circular_rotations(options: Sequence[str], answer: int) -> list[tuple[list[str], int]]:
    """The n circular shifts of an n-option question, each with its right answer's new index.

    VLMEvalKit `vlmeval/tools.py` CIRCULAR builds rotation k by relabelling with
    `deque(labels).rotate(k)`, which moves the option at index i to index (i - k) mod n:
    ["a", "b", "c", "d"] gives rotation 1 = ["b", "c", "d", "a"]. Rotation 0 is the original.
    """
    n = len(options)
    if not 0 <= answer < n:
        raise ValueError(f"answer {answer} is not an index into {n} options")
    return [([options[(p + k) % n] for p in range(n)], (answer - k) % n) for k in range(n)]


def circular_accuracy(correct: Mapping[Hashable, Sequence[bool]]) -> float:
    """Share of groups (a question and its rotations) answered right in every rotation; the
    MMBench CircularEval score. 0.0 for no groups; a group without results is an error."""
    if not correct:
        return 0.0
    passed = 0
    for group, results in correct.items():
        if len(results) == 0:
            raise ValueError(f"group {group!r} has no results")
        passed += all(results)
    return passed / len(correct)
