"""VQAv2 accuracy with the official answer normalisation, and multiple-choice answer parsing."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

# The lists below are copied from the official VQA evaluation (vqaEval.py, VT-vision-lab/VQA).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
         "@", "`", ",", "?", "!"]  # fmt: skip
# vqaEval.py's regexes verbatim: "(?!<=\d)" is a typo for a look-behind, so in effect a period
# is removed unless a digit follows ("2.5" keeps its point, "1." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: a mark next to a space (or any text with "1,000") is deleted,
    otherwise it becomes a space."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # vqaEval passes re.UNICODE (== 32) as sub's `count`; kept for identical results.
    return _PERIOD_STRIP.sub("", out, 32)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, articles dropped,
    contractions restored."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The official normalisation of one answer string."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str] | str) -> float:
    """VQAv2 accuracy of one prediction against the human answers (normally ten).

    The mean over the leave-one-annotator-out subsets of min(#matches / 3, 1), so with ten
    answers: 0 matches -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1. A single answer
    (a string or a one-element list) is scored by exact match after normalisation. Unlike
    vqaEval.py, which normalises only when the annotators disagree (VQAv2's stored answers are
    already normalised), both sides are always normalised, so raw answer lists also score right.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # Leaving out annotator i removes one match exactly when refs[i] matches.
    accs = [min(1.0, (matches - (r == pred)) / 3.0) for r in refs]
    return float(sum(accs) / len(accs))


# ---------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA / MMBench style)
# ---------------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Ordered from most to least specific; the first pattern that names a valid letter wins.
_LETTER_PATTERNS = [
    re.compile(r"^\W*([A-Z])\W*$"),  # the whole answer is a letter: "B", "(B)", "B."
    # the letter stays case-sensitive so "the answer is a dog" does not read as option A
    re.compile(r"(?i:answer\s*(?:is|:)\s*(?:option\s*)?)\(?([A-Z])\b"),
    re.compile(r"^\s*\(?([A-Z])(?:[.:)]|\s*-)"),  # a leading "B.", "(B)", "B)", "B:", "B -"
    re.compile(r"\(([A-Z])\)"),  # "(B)" anywhere
]
_MARKS = str.maketrans({c: " " for c in ".()[],:;!*#{}\"'"})


def _lone_letters(prediction: str, valid: str) -> set[str]:
    """Valid capital letters standing as words (MMBench's can_infer_option); "A" or "I" followed
    by a lower-case word is an article or pronoun, not an answer."""
    words = prediction.translate(_MARKS).split()
    found = set()
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w in valid and not (w in "AI" and nxt[:1].islower()):
            found.add(w)
    return found


def multiple_choice_by_letter(prediction: str, options: Sequence[str]) -> int | None:
    """Index of the option a free-text answer names by letter ("B", "(B)", "B.", "The answer is
    B"), else of the option whose text it matches; None when it names none or several."""
    valid = _LETTERS[: len(options)]
    for pattern in _LETTER_PATTERNS:
        for m in pattern.finditer(prediction):
            letter = m.group(1).upper()
            if letter in valid:
                return valid.index(letter)
    lone = _lone_letters(prediction, valid)
    if len(lone) == 1:
        return valid.index(lone.pop())
    text = prediction.strip().lower().rstrip(".")
    exact = [i for i, o in enumerate(options) if o.strip().lower() == text]
    if exact:
        return exact[0]
    # Option text contained in the answer counts only when unambiguous (MMBench's matching step).
    contained = [i for i, o in enumerate(options) if o.strip() and o.strip().lower() in text]
    return contained[0] if len(contained) == 1 else None


def multiple_choice_by_likelihood(
    option_logprobs: Sequence[float], lengths: Sequence[int] | None = None
) -> int:
    """Index of the most likely option (first on ties); with `lengths`, per-token likelihood."""
    scores = np.asarray(option_logprobs, dtype=np.float64)
    if lengths is not None:
        scores = scores / np.maximum(np.asarray(lengths, dtype=np.float64), 1.0)
    return int(np.argmax(scores))
