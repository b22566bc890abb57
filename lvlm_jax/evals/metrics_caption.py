"""Captioning metrics (CIDEr, BLEU, ROUGE-L) matching pycocoevalcap, with a Python PTB tokenizer."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

Gts = Mapping[Hashable, Sequence[str]]
Res = Mapping[Hashable, Sequence[str]]

# ---------------------------------------------------------------------------------------------
# Tokenizer: the effect of `java PTBTokenizer -preserveLines -lowerCase` followed by
# pycocoevalcap's PUNCTUATIONS filter, as observed on stanford-corenlp-3.4.1 (the jar the COCO
# pipeline ships). Because the filter runs after lower-casing, "-LRB-" etc. never match and
# brackets survive as "-lrb-"/"-rrb-" tokens; we keep that quirk so scores agree with COCO's.
# ---------------------------------------------------------------------------------------------

PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)  # fmt: skip

_OPEN_BRACKETS = {"(": "-LRB-", "[": "-LSB-", "{": "-LCB-"}
_CLOSE_BRACKETS = {")": "-RRB-", "]": "-RSB-", "}": "-RCB-"}

# Words whose trailing period PTBLexer keeps attached (its ABBREV lists, checked against the jar).
_ABBREV_ALWAYS = frozenset(
    """jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri
    ala ariz calif colo conn ct dak fla ga ind kan kans ky md mich minn mo mont neb nev okla penn
    tenn va vt wis wyo mr mrs ms dr drs prof profs sen sens rep reps atty attys lt col gen messrs
    gov govs adm rev maj sgt cpl pvt mt capt st ste ave pres lieut hon brig cmdr comdr pfc spc
    supt supts det m mme mlle inc co cos corp pty pte ptys ltd plc bancorp dept bhd assn univ intl
    sys invt elec natl mfg mtg tel est ext sq jr sr bros blvd rd esq etc al seq bldg ft vs
    ph.d ed.d""".split()
)
# Only abbreviations when capitalised: lower-case they are ordinary words ("the wash.").
_ABBREV_CAPITALISED = frozenset("wash miss del ill ore pa az ark la mass tex".split())
# Only abbreviations before a number ("No. 5").
_ABBREV_BEFORE_NUMBER = frozenset("no nos fig figs art pp op ca prop".split())
_ACRONYM = re.compile(r"[A-Za-z](?:\.[A-Za-z])*")

_SPECIAL_WORDS = {
    "cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"],
    "wanna": ["wan", "na"], "lemme": ["lem", "me"], "gimme": ["gim", "me"],
    "'tis": ["'t", "is"], "'twas": ["'t", "was"], "y'all": ["y'", "all"],
}  # fmt: skip
_CLITIC = re.compile(r"^(.+?)('s|'m|'d|'ll|'re|'ve|n't)$", re.IGNORECASE)
# A leading apostrophe that is part of the word rather than an opening quote.
_APOSTROPHE_WORD = re.compile(r"^'(em|n'|\d0s|tis|twas|s|m|d|ll|re|ve)$", re.IGNORECASE)
_INTERNAL_SPLIT = re.compile(
    r"(-{2,}|;|(?<!\d),|,(?!\d)|(?<!\d):|:(?!\d)|&)"
)  # dashes, semicolons, and commas/colons not inside numbers ("1,000", "3:30")
_UNICODE = str.maketrans({"“": '"', "”": '"', "‘": "`", "’": "'", "—": "--", "–": "--"})


def _keeps_period(stem: str, next_chunk: str) -> bool:
    low = stem.lower()
    if _ACRONYM.fullmatch(stem) or low in _ABBREV_ALWAYS:
        return True
    if low in _ABBREV_CAPITALISED and stem[:1].isupper():
        return True
    return low in _ABBREV_BEFORE_NUMBER and next_chunk[:1].isdigit()


def _split_core(core: str) -> list[str]:
    """Splits a chunk with its outer punctuation removed: inner punctuation, then clitics."""
    if "://" in core or "@" in core or core.lower().startswith("www."):
        return [core]  # URLs and e-mail addresses stay whole
    if re.fullmatch(r"[A-Z]+&[A-Z]+", core):
        return [core]  # "AT&T", "Q&A" stay whole; "m&m" and "rock&roll" are split
    out: list[str] = []
    for piece in _INTERNAL_SPLIT.split(core):
        if not piece:
            continue
        if piece.startswith("--"):
            out.append("--")
        elif piece.lower() in _SPECIAL_WORDS:
            out.extend(_SPECIAL_WORDS[piece.lower()])
        else:
            clitics: list[str] = []
            while (m := _CLITIC.match(piece)) and not _APOSTROPHE_WORD.match(piece):
                piece, clitics = m.group(1), [m.group(2), *clitics]  # "i'd've" -> i 'd 've
            out.extend([piece, *clitics])
    return out


def _split_chunk(chunk: str, next_chunk: str) -> list[str]:
    """PTB tokens of one whitespace-separated chunk (original case)."""
    pre: list[str] = []
    post: list[str] = []
    while chunk:  # leading punctuation
        if chunk.startswith("..."):
            pre.append("...")
            chunk = chunk[3:]
        elif chunk.startswith("--"):
            pre.append("--")
            chunk = chunk.lstrip("-")
        elif chunk.startswith("``"):
            pre.append("``")
            chunk = chunk[2:]
        elif chunk[0] == '"':
            pre.append("``")
            chunk = chunk[1:]
        elif chunk[0] == "`" or (
            chunk[0] == "'"
            and len(chunk) > 1
            and not _APOSTROPHE_WORD.match(chunk)
            and not _APOSTROPHE_WORD.match(chunk.rstrip(".,;:!?\"')]}"))
            and chunk.lower() not in _SPECIAL_WORDS
        ):
            pre.append("`")
            chunk = chunk[1:]
        elif chunk[0] in _OPEN_BRACKETS:
            pre.append(_OPEN_BRACKETS[chunk[0]])
            chunk = chunk[1:]
        elif chunk[0] in "$#%" and len(chunk) > 1 and chunk[1].isdigit():
            pre.append(chunk[0])
            chunk = chunk[1:]
        elif chunk[0] in ",;:*" and len(chunk) > 1:
            pre.append(chunk[0])
            chunk = chunk[1:]
        else:
            break
    while chunk:  # trailing punctuation, innermost last
        m = re.search(r"[!?]+$", chunk)
        if chunk.endswith("..."):
            post.insert(0, "...")
            chunk = re.sub(r"\.{3,}$", "", chunk)
        elif chunk.endswith("--"):
            post.insert(0, "--")
            chunk = chunk.rstrip("-")
        elif chunk.endswith("''") or chunk[-1] == '"':
            post.insert(0, "''")
            chunk = chunk[:-2] if chunk.endswith("''") else chunk[:-1]
        elif chunk[-1] == "'" and len(chunk) > 1 and not _APOSTROPHE_WORD.match(chunk):
            post.insert(0, "'")
            chunk = chunk[:-1]
        elif chunk[-1] in _CLOSE_BRACKETS:
            post.insert(0, _CLOSE_BRACKETS[chunk[-1]])
            chunk = chunk[:-1]
        elif m and m.start() > 0:
            post.insert(0, m.group())
            chunk = chunk[: m.start()]
        elif chunk[-1] in ",;:%*$" and len(chunk) > 1:
            post.insert(0, chunk[-1])
            chunk = chunk[:-1]
        elif chunk[-1] == "." and len(chunk) > 1:
            if _keeps_period(chunk[:-1], next_chunk):
                break
            post.insert(0, ".")
            chunk = chunk[:-1]
        else:
            break
    core = _split_core(chunk) if chunk else []
    return pre + core + post


def ptb_tokens(text: str) -> list[str]:
    """PTBTokenizer's tokens (lower-cased, punctuation not yet removed)."""
    chunks = text.replace("\n", " ").translate(_UNICODE).replace("…", "...").split()
    tokens: list[str] = []
    for i, chunk in enumerate(chunks):
        tokens.extend(_split_chunk(chunk, chunks[i + 1] if i + 1 < len(chunks) else ""))
    return [t.lower() for t in tokens]


def tokenize(text: str) -> str:
    """What the COCO caption pipeline (PTBTokenizer + PUNCTUATIONS filter) makes of `text`."""
    return " ".join(t for t in ptb_tokens(text) if t not in PUNCTUATIONS)


def _prepare(gts: Gts, res: Res, tokenize_text: bool) -> tuple[list, list[list[str]], list[str]]:
    """Checks pycocoevalcap's shapes; returns ids, references and hypotheses (tokenized)."""
    if set(gts) != set(res):
        raise ValueError("gts and res must have the same ids")
    ids = list(gts)
    refs, hyps = [], []
    for key in ids:
        hyp, ref = res[key], gts[key]
        if isinstance(hyp, str) or len(hyp) != 1:
            raise ValueError(f"res[{key!r}] must be a list holding one hypothesis")
        if isinstance(ref, str) or len(ref) < 1:
            raise ValueError(f"gts[{key!r}] must be a non-empty list of references")
        refs.append([tokenize(r) if tokenize_text else r for r in ref])
        hyps.append(tokenize(hyp[0]) if tokenize_text else hyp[0])
    return ids, refs, hyps


def _ngram_counts(sentence: str, n: int) -> dict[tuple[str, ...], int]:
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# CIDEr (pycocoevalcap.cider.cider.Cider, which is CIDEr-D: clipping + Gaussian length penalty)
# ---------------------------------------------------------------------------------------------


def cider_scores(
    gts: Gts, res: Res, *, tokenize: bool = True, n: int = 4, sigma: float = 6.0
) -> dict[Hashable, float]:
    """Per-id CIDEr; document frequencies come from the whole corpus of references."""
    ids, refs, hyps = _prepare(gts, res, tokenize)
    crefs = [[_ngram_counts(r, n) for r in rs] for rs in refs]
    ctest = [_ngram_counts(h, n) for h in hyps]
    doc_freq: dict[tuple[str, ...], float] = defaultdict(float)
    for rs in crefs:
        for ngram in {g for r in rs for g in r}:
            doc_freq[ngram] += 1
    log_n_docs = np.log(float(len(crefs)))

    def to_vec(counts: dict) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, tf in counts.items():
            k = len(ngram) - 1
            vec[k][ngram] = float(tf) * (log_n_docs - np.log(max(1.0, doc_freq.get(ngram, 0.0))))
            norm[k] += vec[k][ngram] ** 2
            # pycocoevalcap counts bigrams here (its `n == 1` test), so the "length" in the
            # penalty is the number of bigrams; kept so that scores match COCO's.
            if k == 1:
                length += tf
        return vec, [float(np.sqrt(x)) for x in norm], length

    scores = []
    for test, rs in zip(ctest, crefs, strict=True):
        vec, norm, length = to_vec(test)
        total = np.zeros(n)
        for r in rs:
            vec_r, norm_r, length_r = to_vec(r)
            penalty = np.e ** (-(float(length - length_r) ** 2) / (2 * sigma**2))
            val = np.zeros(n)
            for k in range(n):
                for ngram, weight in vec[k].items():
                    ref_weight = vec_r[k].get(ngram, 0.0)
                    val[k] += min(weight, ref_weight) * ref_weight  # clipped numerator
                if norm[k] != 0 and norm_r[k] != 0:
                    val[k] /= norm[k] * norm_r[k]
                val[k] *= penalty
            total += val
        scores.append(float(np.mean(total)) / len(rs) * 10.0)
    return dict(zip(ids, scores, strict=True))


def cider(gts: Gts, res: Res, *, tokenize: bool = True, n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr (COCO's "CIDEr", i.e. pycocoevalcap's Cider = CIDEr-D), mean over ids."""
    return float(
        np.mean(list(cider_scores(gts, res, tokenize=tokenize, n=n, sigma=sigma).values()))
    )


# ---------------------------------------------------------------------------------------------
# BLEU (pycocoevalcap.bleu.bleu.Bleu: corpus statistics, "closest" reference length)
# ---------------------------------------------------------------------------------------------


def bleu(gts: Gts, res: Res, *, tokenize: bool = True, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n (a list, as pycocoevalcap's Bleu returns)."""
    _, refs, hyps = _prepare(gts, res, tokenize)
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's smoothing constants
    correct, guess = [0] * n, [0] * n
    test_len_total, ref_len_total = 0, 0
    for hyp, rs in zip(hyps, refs, strict=True):
        max_ref_counts: dict[tuple[str, ...], int] = {}
        ref_lens = []
        for r in rs:
            ref_lens.append(len(r.split()))
            for ngram, c in _ngram_counts(r, n).items():
                max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), c)
        test_len = len(hyp.split())
        # closest reference length, the shorter one on ties
        ref_len_total += min((abs(length - test_len), length) for length in ref_lens)[1]
        test_len_total += test_len
        for k in range(n):
            guess[k] += max(0, test_len - k)
        for ngram, c in _ngram_counts(hyp, n).items():
            correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), c)
    scores, product = [], 1.0
    for k in range(n):
        product *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len_total + tiny) / (ref_len_total + small)
    if ratio < 1:  # brevity penalty
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# ---------------------------------------------------------------------------------------------
# ROUGE-L (pycocoevalcap.rouge.rouge.Rouge: max precision / max recall over references)
# ---------------------------------------------------------------------------------------------


def _lcs_length(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_scores(
    gts: Gts, res: Res, *, tokenize: bool = True, beta: float = 1.2
) -> dict[Hashable, float]:
    """Per-id ROUGE-L F-measure."""
    ids, refs, hyps = _prepare(gts, res, tokenize)
    scores = []
    for hyp, rs in zip(hyps, refs, strict=True):
        cand = hyp.split(" ")  # split(" ") as pycocoevalcap does, not split()
        prec, rec = [], []
        for r in rs:
            ref = r.split(" ")
            lcs = _lcs_length(ref, cand)
            prec.append(lcs / float(len(cand)))
            rec.append(lcs / float(len(ref)))
        p, r_ = max(prec), max(rec)
        scores.append((1 + beta**2) * p * r_ / float(r_ + beta**2 * p) if p and r_ else 0.0)
    return dict(zip(ids, scores, strict=True))


def rouge_l(gts: Gts, res: Res, *, tokenize: bool = True, beta: float = 1.2) -> float:
    """Corpus ROUGE-L: the mean of per-id scores."""
    return float(np.mean(list(rouge_l_scores(gts, res, tokenize=tokenize, beta=beta).values())))
