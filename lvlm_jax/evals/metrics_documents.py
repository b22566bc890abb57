"""Document and chart VQA scores: DocVQA / InfographicVQA ANLS and ChartQA relaxed accuracy."""

from __future__ import annotations

from collections.abc import Sequence


def _levenshtein(a: str, b: str) -> int:
    """Edit distance with unit-cost insertions, deletions and substitutions (two-row DP)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            )
        previous = current
    return previous[-1]


def _normalize_anls(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str] | str, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one reply, as the RRC (CVC) evaluation of
    DocVQA / InfographicVQA and lmms-eval's `anls` compute it.

    Both strings are lower-cased, stripped and have their whitespace runs collapsed; the
    distance NL = lev(answer, reply) / max length, and the similarity 1 - NL is zeroed when it
    falls below `threshold`. The best (smallest) NL over `answers` is taken.

    Two details follow the official script rather than the paper's formula:
    - the max length is that of the *raw* strings (`len(s.upper())`), not of the normalised
      ones, so a reply padded with spaces is divided by a larger length ("parix   " against
      "paris": 1 edit / 8 characters -> 0.875, not 0.8). Without surrounding or repeated
      whitespace the two agree.
    - the comparison is `similarity < threshold`, so a similarity of exactly 0.5 (NL = 0.5)
      scores 0.5 rather than 0.

    An empty reply against a non-empty answer scores 0. When both raw strings are empty the
    length is 0 and NL is taken as 0, so the score is 1 (the script's `0.0 if length == 0`).
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    reply = _normalize_anls(prediction)
    distances = []
    for answer in answers:
        # RRC infographicsvqa_eval.py / lmms_eval/api/metrics.py `anls`: raw-length denominator.
        length = max(len(answer.upper()), len(prediction.upper()))
        edits = _levenshtein(_normalize_anls(answer), reply)
        distances.append(edits / length if length else 0.0)
    similarity = 1.0 - min(distances)
    return similarity if similarity >= threshold else 0.0


def _to_float(text: str) -> float | None:
    """pix2struct's `_to_float`: "12%" -> 0.12, else Python's float(), None when that fails."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed correctness (1.0 or 0.0), as pix2struct `metrics.relaxed_correctness`
    and lmms-eval's chartqa task compute it.

    When both strings parse as numbers and the target is non-zero, the reply is right when
    |pred - target| / |target| <= tolerance. Otherwise (either side not a number, or a target
    of 0) it must equal the target case-insensitively, character for character.

    Parsing is Python's `float()` after one rule: a trailing "%" is removed and the number
    divided by 100, so "12%" and "0.12" are the same number (while "12" and "12%" differ).
    Consequences of following the reference exactly, not fixed here:
    - thousands separators do not parse: "1,000" is a string, so it matches only the exact
      string "1,000" and never "1000" or "1,001";
    - surrounding whitespace is ignored by `float()` (" 12 " is 12) but not by the "%" rule
      ("12% " is not a number) nor by the string comparison ("yes " != "yes");
    - a target of "0" is compared as a string: "0.0" or "0.01" against "0" are wrong;
    - `float()` also accepts "1e3", "1_000", "inf" and "nan" (NaN is never within tolerance).
    """
    pred = _to_float(prediction)
    gold = _to_float(target)
    # `gold` is tested for truth, not for None, in the reference: 0 falls to the string match.
    if pred is not None and gold:
        return float(abs(pred - gold) / abs(gold) <= tolerance)
    return float(prediction.lower() == target.lower())
