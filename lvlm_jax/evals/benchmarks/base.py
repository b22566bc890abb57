"""What a benchmark task is: a reader of its released files, a prompt template, and a scorer
(answer extraction + the benchmark's own metric).

A reader takes the task's folder (`DATA_DIR/<task name>/`, the files laid out as the benchmark
releases them) and returns records; a record it cannot use (a malformed line, an image the
annotation names that is not there) is skipped and counted by reason, never raised, so one bad
line does not cost the whole evaluation. Files the task needs that are absent raise
`MissingFiles`, whose message names them.

Records are dicts with at least
    id       str, unique within the task
    image    a file path, encoded bytes or a uint8 array (the first image when there are several)
    question the question text as the benchmark gives it
and whatever the task's scorer reads (answers, options, answer index, split, group, ...).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lvlm_jax.evals.metrics_choice import parse_choice

# (summary figures, per-example results): what every scorer and evaluator returns.
Result = tuple[dict[str, float], list[dict[str, Any]]]


class MissingFiles(FileNotFoundError):
    """The task's folder lacks files the benchmark's release has; the message names them."""


class Skip(Exception):
    """Raised inside a reader's per-record code: the record is dropped and counted under the
    exception's message (a short reason such as "missing image")."""


@dataclasses.dataclass
class Loaded:
    """A reader's result: the usable records and how many were skipped, by reason."""

    records: list[dict[str, Any]]
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One task. `read(task_dir, limit)` -> Loaded (limit 0: every record); `score(records,
    predictions)` -> Result, predictions being the model's raw replies in record order;
    `prompt` the default template, formatted with `fields(record)`; `name` prefixes every
    figure of the summary (e.g. "docvqa_anls")."""

    name: str
    read: Callable[[str, int], Loaded]
    score: Callable[[Sequence[dict], Sequence[str]], Result]
    prompt: str
    fields: Callable[[dict], Mapping[str, Any]] = lambda rec: {"question": rec["question"]}
    max_new_tokens: int = 16
    description: str = ""  # the released files it reads, for docs and the missing-files line

    def render_prompt(self, record: dict, template: str = "") -> str:
        """The question as the model is asked it: `template` (default: the benchmark's)
        formatted with the record's fields."""
        return (template or self.prompt).format(**self.fields(record))


def require(task_dir: str, *names: str, task: str) -> list[str]:
    """The paths of `names` under `task_dir`, or MissingFiles naming those absent."""
    paths = [os.path.join(task_dir, n) for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if not os.path.exists(p)]
    if missing:
        raise MissingFiles(f"{task}: {task_dir!r} lacks {', '.join(missing)} (the benchmark's "
                           "released files are expected there)")
    return paths


def first_existing(task_dir: str, candidates: Sequence[str], task: str) -> str:
    """The first of several accepted file names (releases differ by version) that exists."""
    for name in candidates:
        path = os.path.join(task_dir, name)
        if os.path.exists(path):
            return path
    raise MissingFiles(f"{task}: {task_dir!r} has none of {', '.join(candidates)}")


def collect(items: Iterable[Any], make: Callable[[Any], dict | None], limit: int) -> Loaded:
    """Records made by `make(item)` for each item until `limit` (0: all) are made; an item
    whose `make` raises Skip (or KeyError/TypeError/ValueError: a malformed entry) is counted
    under its reason. `make` returning None drops the item uncounted (e.g. another split)."""
    loaded = Loaded([])
    for item in items:
        if limit and len(loaded.records) >= limit:
            break
        try:
            record = make(item)
        except Skip as e:
            loaded.skipped[str(e)] += 1
            continue
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            loaded.skipped["malformed entry"] += 1
            continue
        if record is not None:
            loaded.records.append(record)
    return loaded


def image_file(task_dir: str, *parts: str) -> str:
    """The path of an image the annotation names, or Skip("missing image")."""
    path = os.path.join(task_dir, *parts)
    if not os.path.isfile(path):
        raise Skip("missing image")
    return path


def mean(values: Iterable[Any]) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------------------
# Shared by the task modules
# ---------------------------------------------------------------------------------------------

MALFORMED_FILE = "malformed file"


def read_json(path: str, key: str | None = None, kind: type = list) -> Any:
    """The file's JSON (its member `key`), or None when it is not JSON of that shape: the reader
    then counts one "malformed file" (see `collect_parts`) instead of failing the whole run."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if key is not None:
            data = data[key]
    except (OSError, ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        return None
    return data if isinstance(data, kind) else None


def read_jsonl(path: str) -> list[Any]:
    """One value a non-blank line; None for a line that is not JSON, so that the reader's `make`
    fails on it and `collect` counts it as a malformed entry."""
    values: list[Any] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                values.append(json.loads(line))
            except ValueError:
                values.append(None)
    return values


def malformed_file() -> Loaded:
    """A reader's result when its annotation file does not parse."""
    return Loaded([], collections.Counter({MALFORMED_FILE: 1}))


def collect_json(path: str, key: str | None, make: Callable[[Any], dict | None],
                 limit: int) -> Loaded:
    """`collect` over the list in a JSON file (its member `key`); one malformed file counted
    when it does not parse."""
    entries = read_json(path, key)
    return malformed_file() if entries is None else collect(entries, make, limit)


def collect_parts(parts: Sequence[tuple[Iterable[Any] | None, Callable[[Any], dict | None]]],
                  limit: int) -> Loaded:
    """`collect` over several parts (a benchmark's splits) with `limit` shared evenly among them,
    so a limited run still scores every split; a part whose items are None (its file did not
    parse) is counted as one malformed file."""
    loaded = Loaded([])
    for k, (items, make) in enumerate(parts):
        quota = limit // len(parts) + (k < limit % len(parts)) if limit else 0
        if limit and not quota:
            continue
        if items is None:
            loaded.skipped[MALFORMED_FILE] += 1
            continue
        part = collect(items, make, quota)
        loaded.records += part.records
        loaded.skipped.update(part.skipped)
    return loaded


def slug(text: Any) -> str:
    """A figure-name suffix: "yes/no" -> "yes_no", "natural science" -> "natural_science"."""
    return re.sub(r"[^0-9a-z]+", "_", str(text).lower()).strip("_")


def renamed(summary: Mapping[str, float], task: str, old: str = "") -> dict[str, float]:
    """A reused scorer's figures under the task's name: `old` prefix (e.g. "vqa") replaced by
    `task`, or `task` put before a bare name ("cider" -> "coco_captions_cider"); the rest of the
    name made figure-safe."""
    out = {}
    for key, value in summary.items():
        rest = key[len(old):].lstrip("_") if old and key.startswith(old) else key
        out[f"{task}_{slug(rest)}"] = value
    return out


def renaming(score: Callable[[Sequence[dict], Sequence[str]], Result], task: str,
             old: str = "") -> Callable[[Sequence[dict], Sequence[str]], Result]:
    """A reused scorer (evaluators.score_vqa, score_caption) whose figures carry the task's name
    (see `renamed`)."""

    def scorer(records: Sequence[dict], predictions: Sequence[str]) -> Result:
        summary, examples = score(records, predictions)
        return renamed(summary, task, old), examples

    scorer.__doc__ = score.__doc__
    return scorer


def example(index: int, record: Mapping[str, Any], prediction: str, reference: Any,
            **scores: Any) -> dict[str, Any]:
    """One per-example result: what every scorer reports, plus its own scores."""
    return {"index": index, "id": record["id"], "question": record["question"],
            "prediction": prediction, "reference": reference, **scores}


def figures_by(examples: Sequence[Mapping[str, Any]], score: str, figure: str,
               group: str | None = None) -> dict[str, float]:
    """`figure`: the mean of each example's `score`; with `group`, also `figure`_<value> for each
    value of the examples' `group` field."""
    summary = {figure: mean(e[score] for e in examples)}
    if group is not None:
        for value in sorted({e[group] for e in examples if e.get(group)}):
            summary[f"{figure}_{slug(value)}"] = mean(e[score] for e in examples
                                                       if e[group] == value)
    return summary


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# LLaVA-1.5's --single-pred-prompt (model_vqa_science.py, model_vqa_mmbench.py) and lmms-eval's.
LETTER_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def lettered(options: Sequence[str], form: str = "{letter}. {option}") -> str:
    """The options one a line, "A. dog\\nB. cat" (MMMU's official prompt: "(A) dog")."""
    return "\n".join(form.format(letter=LETTERS[k], option=o) for k, o in enumerate(options))


def choice_examples(records: Sequence[dict], predictions: Sequence[str],
                    keep: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per-example results of a lettered multiple-choice task: the option the reply names
    (`choice`, None when none) and `correct` against the record's `answer` index; the record
    fields named in `keep` are copied (a split, a subject, a circular group)."""
    examples = []
    for i, (rec, pred) in enumerate(zip(records, predictions, strict=True)):
        choice = parse_choice(pred, rec["options"])
        answer = rec["answer"]
        examples.append(example(i, rec, pred, f"{LETTERS[answer]}. {rec['options'][answer]}",
                                choice=choice, correct=choice == answer,
                                **{k: rec.get(k) for k in keep}))
    return examples
