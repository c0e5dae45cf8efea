"""Question/answer problems from your own data, for training and evaluation.

    from reval.data import load_problems

    problems = load_problems("data/train.jsonl")                       # {"question": ..., "answer": ...}
    problems = load_problems("gsm8k_train.parquet", preset="gsm8k")    # answer "... #### 72" -> "72"
    problems = load_problems("math.csv", preset="math")                # solution "... \\boxed{5}" -> "5"
    problems = load_problems("openai/gsm8k:main", preset="gsm8k", split="test", limit=100)
    problems = load_problems("gpqa_diamond.csv", preset="choice")      # question + A) ... D), answer "C"
    problems = load_problems(my_dataset, question_field="prompt", answer_field="target")

Each `Problem` holds the question and the reference final answer as a string, ready for a
verifier. Where the data comes from:

- a `.jsonl` / `.json` file of JSON lines, one object per line (blank lines are skipped); a
  `.json` file holding one JSON array of objects also works;
- a `.parquet` or `.csv` file (CSV cells are read as text, so "007" stays "007");
- a directory written by `datasets`' `Dataset.save_to_disk` or `DatasetDict.save_to_disk`
  (for a DatasetDict, `split` picks the split);
- a `datasets.Dataset`, `DatasetDict` or `IterableDataset` already in memory;
- any other string: a Hugging Face hub dataset id, "name" or "name:config"
  (e.g. "openai/gsm8k:main"), loaded with `datasets.load_dataset(name, config, split=split)`.
  A string that looks like a path (starts with "/", ".", "~", ends in a file suffix such as
  .jsonl or .txt, or has more than one "/") is never sent to the hub: if it does not exist,
  FileNotFoundError.

A preset (`PRESETS`) names the question and answer fields and says how to get the final answer
out of the raw answer field: "qa" (question/answer, as is), "gsm8k" (question/answer, the text
after the last "####"), "math" (problem/solution, the last \\boxed{...}), "deepscaler" and
"aime" (problem/answer, as is), "choice" (multiple choice, below). `question_field` /
`answer_field` override the preset's names.

The "choice" preset (GPQA-Diamond, MMLU-style data) reads one of two row layouts:

- `question`, `choices` (a list of 2 to 10 strings) and `answer`: a letter "A".."J", the 0-based
  index of the right choice (an integer, as MMLU stores it), or the exact text of the right
  choice. A single capital letter is always read as a letter, never as a choice's text.
- GPQA's raw columns: "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
  ... . The correct answer would always come first, so the choices are shuffled with a seed
  taken from the question text: the same order on every load, whatever the file order.

The question becomes the question text, a blank line and one line per choice ("A) ...",
"B) ..."), so a model can answer with a letter; the reference answer is the letter. Score it
with the `multiple_choice` reward (`reval.tasks.choice`).

Bad rows (a missing field, an empty question, an answer that is not a string or number, no
final answer to extract, text holding a lone surrogate such as JSON's "\\ud800"; for JSON lines
also invalid UTF-8 or JSON, JSON nested too deeply to parse, or not an object) raise
ValueError naming the source, the first bad row and how many others there are. Rows are
numbered from 1: for JSON lines the line number in the file, for CSV the data row (the header
is not counted, a quoted cell spanning lines is one row), for everything else the row index + 1.
With `skip_bad_rows=True` bad rows are skipped and a warning gives their count.

`limit` keeps N usable problems. With `limit_mode="random"` (the default, the paper's protocol:
a random 100 per benchmark) they are `random.Random(limit_seed).sample` of the indices of all
usable rows, kept in file order: the same rows on every call and for every model, as long as
the file and the seed stay the same. Every row is read, so a bad row anywhere is reported.
With `limit_mode="first"` they are the first N usable rows; rows after those are not read, so
not checked either.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reval.tasks.choice import LETTERS, lettered_question
from reval.tasks.math import last_boxed


@dataclass(frozen=True, slots=True)  # slots: 40 bytes less per problem (40 MB a million)
class Problem:
    question: str
    answer: str
    """The reference final answer as a string, ready for a verifier (e.g. "18", "\\frac{1}{2}")."""
    columns: dict[str, Any] | None = field(default=None, compare=False)
    """The row's other fields (None if it has none): reward functions get each as a keyword
    argument, as in TRL, next to `question` and `answer`. Not part of a problem's identity."""


@dataclass(frozen=True)
class Preset:
    """A dataset schema: where the question and answer are, and how to get the final answer."""

    question_field: str
    answer_field: str
    final_answer: Callable[[str], str | None]
    """Raw answer text -> final answer, or None when the text has none."""
    expects: str
    """What `final_answer` looks for, for error messages."""
    read_row: Callable[[dict[str, Any], str, str], Problem | str] | None = None
    """(row, question field, answer field) -> the problem or what is wrong with the row, for a
    schema that builds the question from more than one field (multiple choice); None: the
    question field as is and `final_answer` of the answer field."""


def _as_is(text: str) -> str:
    return text


def _after_hashes(text: str) -> str | None:
    # GSM8K solutions end with "#### 1,234"; the verifier wants the bare number.
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def _choice_problem(row: dict[str, Any], q_field: str, a_field: str) -> Problem | str:
    """A multiple-choice row (either layout in the module doc): lettered question, answer letter."""
    if "choices" not in row and "Correct Answer" in row:
        return _gpqa_problem(row)
    problem = _missing(row, (q_field, "choices", a_field)) or _not_text(row, q_field)
    if problem:
        return problem
    choices = row["choices"]
    if not isinstance(choices, (list, tuple)) or not 2 <= len(choices) <= len(LETTERS):
        got = f"{len(choices)} choices" if isinstance(choices, (list, tuple)) else _describe(choices)
        return f"field 'choices' must be a list of 2 to {len(LETTERS)} choices, got {got}"
    texts = [_choice_text(c) for c in choices]
    if not all(texts):
        i = texts.index("")
        return f"choice {LETTERS[i]} in field 'choices' must be a non-empty string, got {_describe(choices[i])}"
    i = _answer_index(row[a_field], texts)
    if i is None:
        n = len(texts)
        return (f"field {a_field!r} is {_describe(row[a_field])}: expected a letter A-{LETTERS[n - 1]}, "
                f"a 0-based index below {n} or the text of one of the {n} choices")
    return Problem(lettered_question(row[q_field], texts), LETTERS[i])


def _gpqa_problem(row: dict[str, Any]) -> Problem | str:
    """GPQA's raw layout: the correct answer and "Incorrect Answer 1", "... 2", ... columns."""
    wrong = ["Incorrect Answer 1"]
    while f"Incorrect Answer {len(wrong) + 1}" in row and len(wrong) < len(LETTERS) - 1:
        wrong.append(f"Incorrect Answer {len(wrong) + 1}")
    fields = ["Correct Answer", *wrong]
    problem = _missing(row, ["Question", *fields]) or _not_text(row, "Question")
    if problem:
        return problem
    texts = [_choice_text(row[f]) for f in fields]
    if not all(texts):
        name = fields[texts.index("")]
        return f"field {name!r} must be a non-empty string, got {_describe(row[name])}"
    # The correct answer is texts[0]; shuffle so it is not always A. The seed is the question
    # text (random.Random hashes a str seed with SHA-512, not Python's salted hash()), so every
    # load gives the same order, wherever the row sits in the file.
    order = list(range(len(texts)))
    random.Random(row["Question"]).shuffle(order)
    return Problem(lettered_question(row["Question"], [texts[i] for i in order]), LETTERS[order.index(0)])


def _choice_text(value: Any) -> str:
    """A choice as stripped text; "" when it is empty or not a string or number."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    return str(value).strip()


def _answer_index(raw: Any, texts: list[str]) -> int | None:
    """The right choice's index from a letter, a 0-based index or its text; None if none fits."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw if 0 <= raw < len(texts) else None
    if not isinstance(raw, str):
        return None
    raw = raw.strip()
    if len(raw) == 1 and raw in LETTERS:  # a capital letter is a letter, even if a choice reads "B"
        i = LETTERS.index(raw)
        return i if i < len(texts) else None
    matches = [i for i, text in enumerate(texts) if text == raw]
    return matches[0] if len(matches) == 1 else None


PRESETS: dict[str, Preset] = {
    "qa": Preset("question", "answer", _as_is, "an answer"),
    "gsm8k": Preset("question", "answer", _after_hashes, "a final '#### <answer>' (GSM8K format)"),
    "math": Preset("problem", "solution", last_boxed, "a \\boxed{...} answer (MATH format)"),
    "deepscaler": Preset("problem", "answer", _as_is, "an answer"),
    "aime": Preset("problem", "answer", _as_is, "an answer"),
    "choice": Preset("question", "answer", _as_is, "a letter, index or choice text", _choice_problem),
}

FILE_FORMATS = {".jsonl": "JSON lines", ".json": "JSON lines", ".parquet": "Parquet", ".csv": "CSV"}
# Suffixes that mark a string as a file name (hub ids rarely have one), supported or not.
_FILE_SUFFIXES = {*FILE_FORMATS, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".xlsx", ".yaml", ".yml"}

TRAIN_FIX = ("fix the rows, or choose --task.preset / --task.question-field / --task.answer-field "
             "(Python: preset=, question_field=, answer_field=)")
EVAL_FIX = "fix the rows, choose --preset / --question-field / --answer-field, or pass --skip-bad-rows"

# (where the row is, e.g. "line 7" or "row 3"; the row, or what is wrong with it)
Row = tuple[str, "dict[str, Any] | str"]


LIMIT_MODES = ("random", "first")


def extra_columns(problems) -> dict[str, list]:
    """The rows' columns other than question and answer, one value per problem (None if absent)."""
    extra = [getattr(p, "columns", None) or {} for p in problems]
    return {key: [row.get(key) for row in extra] for key in dict.fromkeys(k for row in extra for k in row)}


def load_problems(source: Any, *, preset: str = "qa", question_field: str | None = None,
                  answer_field: str | None = None, split: str = "train", limit: int | None = None,
                  limit_mode: str = "random", limit_seed: int = 0,
                  skip_bad_rows: bool = False, fix_hint: str = TRAIN_FIX) -> list[Problem]:
    """Problems from a file, a saved or in-memory dataset, or a hub dataset id (see the module doc).

    `limit` keeps N problems: a seeded random subsample in file order (`limit_mode="random"`,
    seed `limit_seed`) or the first N (`limit_mode="first"`). `fix_hint` ends the message of a
    bad row: how to fix it, in the calling command's own flags.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of problems (or None for all), got {limit}")
    if limit_mode not in LIMIT_MODES:
        raise ValueError(f"limit_mode {limit_mode!r} is unknown; choose one of {LIMIT_MODES}")
    schema = PRESETS[preset]
    q_field = question_field or schema.question_field
    a_field = answer_field or schema.answer_field
    name, rows = _open(source, split)
    stop = limit if limit_mode == "first" else None  # random: every row is read (and checked)
    problems = _collect_rows(name, rows, lambda row: _problem(row, schema, q_field, a_field), stop, skip_bad_rows,
                             fix_hint)
    if limit_mode == "random" and limit is not None and len(problems) > limit:
        # Indices drawn over all usable rows, then sorted: the subsample depends only on the
        # seed and the data, never on how the rows were read, and keeps the file's order.
        keep = sorted(random.Random(limit_seed).sample(range(len(problems)), limit))
        problems = [problems[i] for i in keep]
    return problems


# --- demonstrations and preference pairs -----------------------------------------------------

@dataclass(frozen=True, slots=True)
class Demonstration:
    """A prompt and a response to imitate (`reval train --algo mle|iq`)."""

    prompt: str
    response: str


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """A prompt, the preferred answer and the other one (`reval train --algo dpo|qadapter`)."""

    prompt: str
    chosen: str
    rejected: str


DEMO_FIX = ("fix the rows, or name the fields with --task.question-field (prompt) / --task.answer-field "
            "(response)")
PAIR_FIX = "fix the rows, or name the prompt field with --task.question-field"


def load_demonstrations(source: Any, *, prompt_field: str | None = None, response_field: str | None = None,
                        split: str = "train", limit: int | None = None, skip_bad_rows: bool = False,
                        fix_hint: str = DEMO_FIX) -> list[Demonstration]:
    """Prompt / response rows (default fields "prompt" and "response") from any source
    `load_problems` reads, with the same errors for bad rows. `limit`: the first N."""
    p_field, r_field = prompt_field or "prompt", response_field or "response"

    def read(row: dict[str, Any]) -> Demonstration | str:
        bad = _missing(row, (p_field, r_field)) or _not_text(row, p_field) or _not_text(row, r_field)
        return bad or Demonstration(row[p_field], row[r_field])

    name, rows = _open(source, split)
    return _collect_rows(name, rows, read, limit, skip_bad_rows, fix_hint)


def load_preferences(source: Any, *, prompt_field: str | None = None, split: str = "train",
                     limit: int | None = None, skip_bad_rows: bool = False,
                     fix_hint: str = PAIR_FIX) -> list[PreferencePair]:
    """Prompt / chosen / rejected rows (TRL's preference columns; the prompt field can be
    renamed) from any source `load_problems` reads, with the same errors for bad rows. A row
    whose two answers are the same text states no preference and is a bad row. `limit`: the first N."""
    p_field = prompt_field or "prompt"

    def read(row: dict[str, Any]) -> PreferencePair | str:
        bad = _missing(row, (p_field, "chosen", "rejected")) or _not_text(row, p_field) \
            or _not_text(row, "chosen") or _not_text(row, "rejected")
        if not bad and row["chosen"] == row["rejected"]:
            bad = "fields 'chosen' and 'rejected' are the same text, which states no preference"
        return bad or PreferencePair(row[p_field], row["chosen"], row["rejected"])

    name, rows = _open(source, split)
    return _collect_rows(name, rows, read, limit, skip_bad_rows, fix_hint)


# --- where the rows come from ----------------------------------------------------------------

def _open(source: Any, split: str) -> tuple[str, Iterable[Row]]:
    """A name for error messages and the rows of `source`."""
    if isinstance(source, os.PathLike):
        return _open_path(Path(source), split)
    if isinstance(source, str):
        if not source.strip():
            raise ValueError("data source is an empty string; pass a file, directory or dataset id")
        path = Path(source).expanduser()
        if path.exists() or _looks_like_path(source):
            return _open_path(path, split, name=source)
        return _open_hub(source, split)
    if isinstance(source, (list, tuple)):
        return "list of rows", ((f"row {i}", r if isinstance(r, dict) else
                                 f"must be a mapping of field names to values, got {_describe(r)}")
                                for i, r in enumerate(source, start=1))
    datasets = _import_datasets()
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return _pick_split("dataset in memory", source, split)
    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return "dataset in memory", _dataset_rows(source)
    raise TypeError(f"cannot load problems from a {type(source).__name__}; pass a file path, "
                    "a save_to_disk directory, a hub dataset id, or a datasets.Dataset/DatasetDict")


def _looks_like_path(source: str) -> bool:
    # Hub ids are "name" or "owner/name" with no file suffix; anything else is meant as a path.
    return (source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source
            or Path(source).suffix.lower() in _FILE_SUFFIXES)


def _open_path(path: Path, split: str, name: str | None = None) -> tuple[str, Iterable[Row]]:
    # Files are read by our own small readers rather than `datasets.load_dataset`, which
    # infers one schema for the whole file and fails with an Arrow cast error that names no
    # line: here every bad row is reported with its file and line (and can be skipped),
    # rows are streamed (flat memory for a million rows), and nothing is cached on disk.
    # save_to_disk directories and hub ids do go through `datasets`.
    name = name or str(path)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file or directory")
    if path.is_dir():
        return _open_saved(path, name, split)
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        formats = ", ".join(f"{s} ({f})" for s, f in FILE_FORMATS.items())
        raise ValueError(f"{name}: unsupported file type {suffix or '(no suffix)'!r}; use {formats}, "
                         "or a directory written by datasets' save_to_disk")
    if suffix == ".parquet":
        return name, _parquet_rows(path, name)
    if suffix == ".csv":
        return name, _csv_rows(path, name)
    if suffix == ".json" and _starts_with_array(path):
        return name, _json_array_rows(path, name)
    return name, _jsonl_rows(path)


def _open_saved(path: Path, name: str, split: str) -> tuple[str, Iterable[Row]]:
    datasets = _import_datasets()
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:  # a directory, but not one save_to_disk wrote
        raise ValueError(f"{name}: not a dataset directory written by save_to_disk ({e}); "
                         "pass a .jsonl/.parquet/.csv file or a save_to_disk directory") from None
    if isinstance(data, datasets.DatasetDict):
        return _pick_split(name, data, split)
    return name, _dataset_rows(data)


def _open_hub(dataset_id: str, split: str) -> tuple[str, Iterable[Row]]:
    datasets = _import_datasets()
    repo, _, config = dataset_id.partition(":")
    name = f"{dataset_id} (split {split!r})"
    try:
        data = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # offline, no such dataset, no such config or split, ...
        raise ValueError(f"{dataset_id!r} is not a local file or directory, and loading it as a "
                         f"Hugging Face hub dataset (config {config or None!r}, split {split!r}) "
                         f"failed: {type(e).__name__}: {e}") from e
    return name, _dataset_rows(data)


def _pick_split(name: str, data: Any, split: str) -> tuple[str, Iterable[Row]]:
    if split not in data:
        raise ValueError(f"{name}: no split {split!r}; available splits: {sorted(data)}; pick one with split")
    return f"{name} (split {split!r})", _dataset_rows(data[split])


def _dataset_rows(data: Any) -> Iterator[Row]:
    for i, row in enumerate(data, start=1):
        yield f"row {i}", row


def _jsonl_rows(path: Path) -> Iterator[Row]:
    # Read line by line ourselves so every error can name its line.
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if raw.strip():
                yield f"line {n}", _json_object(raw, bom=n == 1)


def _json_object(raw: bytes, bom: bool = False) -> dict[str, Any] | str:
    try:
        row = json.loads(raw.decode("utf-8-sig" if bom else "utf-8").rstrip())
    except UnicodeDecodeError:
        return "not valid UTF-8"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg}, column {e.pos + 1})"  # one line, so pos is the column
    except RecursionError:
        return "JSON nested too deeply to read (arrays or objects thousands of levels deep)"
    if not isinstance(row, dict):
        return f"expected a JSON object, got {_json_type(row)}"
    return row


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as fh:
        for raw in fh:
            text = raw.lstrip(b"\xef\xbb\xbf").strip()
            if text:
                return text.startswith(b"[")
    return False


def _json_array_rows(path: Path, name: str) -> Iterator[Row]:
    try:
        items = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: line {e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{name}: JSON nested too deeply to read (arrays or objects thousands of "
                         "levels deep)") from None
    if not isinstance(items, list):  # only reached if "[" was not the real start
        raise ValueError(f"{name}: expected a JSON array of objects or JSON lines")
    for i, item in enumerate(items, start=1):
        bad = f"expected a JSON object, got {_json_type(item)}"
        yield f"row {i}", item if isinstance(item, dict) else bad


def _parquet_rows(path: Path, name: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{name}: could not read as Parquet ({e})") from None
    i = 0
    for batch in batches:
        for row in batch.to_pylist():
            i += 1
            yield f"row {i}", row


def _csv_rows(path: Path, name: str) -> Iterator[Row]:
    import pandas as pd

    try:
        # Every cell as text, empty cells as "" (not NaN), so answers keep their exact spelling.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{name}: could not read as CSV ({e})") from None
    for i, row in enumerate(frame.to_dict("records"), start=1):
        yield f"row {i}", row


# --- from rows to problems -------------------------------------------------------------------

def _collect_rows(name: str, rows: Iterable[Row], read: Callable[[dict[str, Any]], Any], limit: int | None,
                  skip_bad_rows: bool, fix_hint: str) -> list:
    """`read(row)` of every row (a record, or a string saying what is wrong with the row)."""
    problems: list = []
    first_bad, num_bad = "", 0  # only the first is reported: a million bad rows hold no million messages
    for where, row in rows:
        problem = row if isinstance(row, str) else read(row)
        if isinstance(problem, str):
            first_bad, num_bad = first_bad or f"{where}: {problem}", num_bad + 1
            continue
        problems.append(problem)
        if limit is not None and len(problems) == limit:
            break
    if num_bad and not skip_bad_rows:
        others = f" (and {num_bad - 1} more bad rows)" if num_bad > 1 else ""
        raise ValueError(f"{name}: {first_bad}{others}; {fix_hint}")
    if not problems:
        first = f" ({num_bad} bad rows, first: {first_bad})" if num_bad else ""
        raise ValueError(f"{name}: no usable rows{first}")
    if num_bad:
        warnings.warn(f"{name}: skipped {num_bad} bad rows (first: {first_bad})", stacklevel=3)
    return problems


def _problem(row: dict[str, Any], schema: Preset, q_field: str, a_field: str) -> Problem | str:
    """The problem in one row, or a string saying what is wrong with the row."""
    if schema.read_row is not None:
        problem = schema.read_row(row, q_field, a_field)  # the question field is checked there
        if isinstance(problem, str):
            return problem
        return _not_unicode(problem.question, "a choice") or dataclasses.replace(problem, columns=_other_columns(row))
    problem = _missing(row, (q_field, a_field)) or _not_text(row, q_field)
    if problem:
        return problem
    question, raw = row[q_field], row[a_field]
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        return f"field {a_field!r} must be a string or number, got {_describe(raw)}"
    if isinstance(raw, float) and not math.isfinite(raw):
        return f"field {a_field!r} must be a finite number, got {raw}"
    if isinstance(raw, str) and (problem := _not_unicode(raw, f"field {a_field!r}")):
        return problem
    answer = schema.final_answer(str(raw))
    if answer is None:
        return f"field {a_field!r} has no final answer: expected {schema.expects}"
    if not answer.strip():
        return f"field {a_field!r} gives an empty answer"
    return Problem(question, answer.strip(), _other_columns(row))


def _other_columns(row: dict[str, Any]) -> dict[str, Any] | None:
    return {k: v for k, v in row.items() if k not in ("question", "answer")} or None


def _missing(row: dict[str, Any], fields: Iterable[str]) -> str | None:
    """What is wrong when some of `fields` are not in the row, else None."""
    missing = [f for f in dict.fromkeys(fields) if f not in row]
    if not missing:
        return None
    names = " and ".join(repr(f) for f in missing)
    return f"missing field{'s' if len(missing) > 1 else ''} {names} (fields: {sorted(row)})"


def _not_text(row: dict[str, Any], field: str) -> str | None:
    """What is wrong when the field is not a non-empty string (a question), else None."""
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        return f"field {field!r} must be a non-empty string, got {_describe(value)}"
    return _not_unicode(value, f"field {field!r}")


def _not_unicode(text: str, what: str) -> str | None:
    """What is wrong when `text` holds a lone surrogate (JSON allows "\\ud800"; no tokenizer
    or UTF-8 file can hold it), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        at = f" at character {e.start + 1}" if what.startswith("field") else ""
        return (f"{what} holds a lone surrogate {text[e.start]!r}{at}, which is not valid Unicode "
                "text (a broken \\uXXXX escape)")
    return None


def _describe(value: Any) -> str:
    """A short description of a bad value for error messages."""
    if isinstance(value, str):
        return "an empty string" if not value.strip() else repr(value)
    return "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError("loading saved or hub datasets needs the `datasets` package: "
                          "pip install datasets") from None
    return datasets
