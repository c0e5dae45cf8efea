"""load_problems: every source format, the presets, and the errors for bad rows and sources."""

import json
import warnings

import datasets
import pandas as pd
import pytest

from reval.data import PRESETS, Problem, load_problems

GSM8K_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                "clips in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
MATH_ROW = {
    "problem": "What is $\\frac{2}{4}$ in lowest terms?",
    "solution": "Divide by $2$: $\\boxed{2}$ is the gcd, so the answer is $\\boxed{\\frac{1}{2}}$.",
    "level": "Level 1",
}
QA = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": 4},
      {"question": "half?", "answer": 0.5}]
EXPECTED_QA = [Problem("1+1?", "2"), Problem("2+2?", "4"), Problem("half?", "0.5")]


def write_jsonl(path, rows, blank_lines=False):
    """Rows as JSON lines; a str row is written verbatim (to make broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n", encoding="utf-8")
    return path


def error(excinfo) -> str:
    return str(excinfo.value)


# --- formats ---------------------------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", QA, blank_lines=True)
    assert load_problems(path) == EXPECTED_QA
    assert load_problems(str(path)) == EXPECTED_QA  # a str path works too
    assert load_problems(write_jsonl(tmp_path / "train.json", QA)) == EXPECTED_QA


def test_jsonl_with_bom_and_json_array(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(QA[0]).encode() + b"\n")
    assert load_problems(bom) == EXPECTED_QA[:1]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(QA, indent=2))
    assert load_problems(array) == EXPECTED_QA
    array.write_text(json.dumps([QA[0], "oops"]))
    with pytest.raises(ValueError, match=r"array\.json: row 2: expected a JSON object, got a string"):
        load_problems(array)


def test_parquet_round_trip(tmp_path):
    path = tmp_path / "aime.parquet"
    pd.DataFrame({"problem": ["p1", "p2"], "answer": [18, 204], "id": [1, 2]}).to_parquet(path)
    assert load_problems(path, preset="aime") == [Problem("p1", "18"), Problem("p2", "204")]


def test_csv_round_trip_reads_cells_as_text(tmp_path):
    path = tmp_path / "qa.csv"
    # An all-digit column would become ints (007 -> 7) and "NA" a NaN if pandas guessed types.
    frame = pd.DataFrame({"question": ["line one\nline two", "NA"], "answer": ["007", "18"]})
    frame.to_csv(path, index=False)
    assert load_problems(path) == [Problem("line one\nline two", "007"), Problem("NA", "18")]


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    ds = datasets.Dataset.from_list([{"question": "1+1?", "answer": 2}, {"question": "2+2?", "answer": 4}])
    ds.save_to_disk(tmp_path / "ds")
    assert load_problems(tmp_path / "ds") == EXPECTED_QA[:2]

    test = datasets.Dataset.from_list([{"question": "t", "answer": 9}])
    dd = datasets.DatasetDict({"train": ds, "test": test})
    dd.save_to_disk(tmp_path / "dd")
    assert load_problems(str(tmp_path / "dd"), split="test") == [Problem("t", "9")]
    assert load_problems(tmp_path / "dd") == EXPECTED_QA[:2]  # split defaults to "train"
    with pytest.raises(ValueError, match=r"dd: no split 'validation'; available splits: \['test', 'train'\]"):
        load_problems(tmp_path / "dd", split="validation")


def test_in_memory_dataset_and_datasetdict():
    ds = datasets.Dataset.from_list([{"problem": "p", "answer": 7}, {"problem": "", "answer": 8}])
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        assert load_problems(ds, preset="deepscaler", skip_bad_rows=True, limit=1) == [Problem("p", "7")]
    with pytest.raises(ValueError, match=r"dataset in memory: row 2: field 'problem' must be a non-empty"):
        load_problems(ds, preset="deepscaler")
    dd = datasets.DatasetDict({"test": ds})
    # first: row 2 (bad) lies past the limit and is never read; random reads (and checks) it
    assert load_problems(dd, preset="aime", split="test", limit=1, limit_mode="first") == [Problem("p", "7")]
    with pytest.raises(ValueError, match=r"row 2: field 'problem' must be a non-empty"):
        load_problems(dd, preset="aime", split="test", limit=1)
    with pytest.raises(ValueError, match=r"no split 'train'; available splits: \['test'\]"):
        load_problems(dd, preset="aime")


def test_hub_id_with_config(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([GSM8K_ROW])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    expected = [Problem(GSM8K_ROW["question"], "72")]
    assert load_problems("openai/gsm8k:main", preset="gsm8k", split="test") == expected
    assert load_problems("gsm8k", preset="gsm8k") == expected
    assert calls == [("openai/gsm8k", "main", "test"), ("gsm8k", None, "train")]


def test_hub_errors_are_wrapped(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"'someone/data:cfg' is not a local file.*config 'cfg', "
                                         r"split 'train'.*ConnectionError: no network"):
        load_problems("someone/data:cfg")


# --- presets ---------------------------------------------------------------------------------

def test_gsm8k_final_answer(tmp_path):
    rows = [GSM8K_ROW, {"question": "Big?", "answer": "1,000 + 234 = 1,234\n#### 1,234"},
            {"question": "Two marks?", "answer": "#### 3 is wrong\n####  -5 "}]
    problems = load_problems(write_jsonl(tmp_path / "gsm8k.jsonl", rows), preset="gsm8k")
    assert [p.answer for p in problems] == ["72", "1234", "-5"]
    assert problems[0].question == GSM8K_ROW["question"]


def test_math_last_boxed_with_nested_braces(tmp_path):
    rows = [MATH_ROW, {"problem": "Box?", "solution": "So $x = \\boxed{\\sqrt{\\frac{a}{b}}}$."}]
    problems = load_problems(write_jsonl(tmp_path / "math.jsonl", rows), preset="math")
    assert problems == [Problem(MATH_ROW["problem"], "\\frac{1}{2}"), Problem("Box?", "\\sqrt{\\frac{a}{b}}")]


@pytest.mark.parametrize("preset", ["deepscaler", "aime"])
def test_problem_answer_presets_take_ints(tmp_path, preset):
    rows = [{"problem": "Find n.", "answer": 204}, {"problem": "Find m.", "answer": " 033 "}]
    path = write_jsonl(tmp_path / f"{preset}.jsonl", rows)
    assert load_problems(path, preset=preset) == [Problem("Find n.", "204"), Problem("Find m.", "033")]


def test_field_overrides(tmp_path):
    path = write_jsonl(tmp_path / "custom.jsonl", [{"prompt": "Q?", "target": "#### 9", "answer": "x"}])
    assert load_problems(path, question_field="prompt", answer_field="target") == [Problem("Q?", "#### 9")]
    gsm8k = load_problems(path, preset="gsm8k", question_field="prompt", answer_field="target")
    assert gsm8k == [Problem("Q?", "9")]
    # Overriding one field keeps the preset's other one.
    assert load_problems(path, question_field="prompt") == [Problem("Q?", "x")]


def test_presets_are_the_documented_ones():
    assert sorted(PRESETS) == ["aime", "choice", "deepscaler", "gsm8k", "math", "qa"]
    assert (PRESETS["math"].question_field, PRESETS["math"].answer_field) == ("problem", "solution")


# --- bad rows --------------------------------------------------------------------------------

# Each bad row goes on line 4 of the file, after a good row and a blank line.
BAD_ROWS = [
    ("qa", '{"question": "q"}', r"missing field 'answer' \(fields: \['question'\]\)"),
    ("math", '{"question": "q", "answer": "a"}',
     r"missing fields 'problem' and 'solution' \(fields: \['answer', 'question'\]\)"),
    ("qa", '{"question": "  ", "answer": "1"}',
     r"field 'question' must be a non-empty string, got an empty string"),
    ("qa", '{"question": 5, "answer": "1"}', r"field 'question' must be a non-empty string, got int '5'"),
    ("qa", '{"question": "q", "answer": true}', r"field 'answer' must be a string or number, got bool"),
    ("qa", '{"question": "q", "answer": null}', r"field 'answer' must be a string or number, got null"),
    ("qa", '{"question": "q", "answer": [1]}', r"field 'answer' must be a string or number, got list"),
    ("qa", '{"question": "q", "answer": NaN}', r"field 'answer' must be a finite number"),
    ("qa", '{"question": "q", "answer": " "}', r"field 'answer' gives an empty answer"),
    ("gsm8k", '{"question": "q", "answer": "72"}',
     r"field 'answer' has no final answer: expected a final '#### <answer>'"),
    ("gsm8k", '{"question": "q", "answer": "x ####  "}', r"field 'answer' gives an empty answer"),
    ("math", '{"problem": "q", "solution": "it is 5"}',
     r"field 'solution' has no final answer: expected a \\boxed"),
    ("math", '{"problem": "q", "solution": "\\\\boxed{5"}', r"field 'solution' has no final answer"),
    ("qa", '{"question": "q", "answer": "1"', r"not valid JSON \(Expecting ',' delimiter, column 32\)"),
    ("qa", '["q", "1"]', r"expected a JSON object, got an array"),
    ("qa", '"q"', r"expected a JSON object, got a string"),
    ("qa", '{"question": "x\\ud800y", "answer": "1"}',
     r"field 'question' holds a lone surrogate '\\ud800' at character 2, which is not valid Unicode text"),
    ("qa", '{"question": "q", "answer": "\\udfff"}', r"field 'answer' holds a lone surrogate '\\udfff'"),
]
GOOD_ROW = {"question": "q", "answer": "#### 1", "problem": "q", "solution": "\\boxed{1}"}


@pytest.mark.parametrize("preset,line,message", BAD_ROWS)
def test_bad_jsonl_row_names_file_and_line(tmp_path, preset, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n\n" + json.dumps(GOOD_ROW) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"train\.jsonl: line 4: {message}.*; fix the rows, "
                                         r"or choose --task\.preset / --task\.question-field / --task\.answer-field"):
        load_problems(path, preset=preset)
    with pytest.warns(UserWarning, match=rf"train\.jsonl: skipped 1 bad rows \(first: line 4: {message}"):
        assert len(load_problems(path, preset=preset, skip_bad_rows=True)) == 2


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD_ROW).encode() + b'\n{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl: line 2: not valid UTF-8"):
        load_problems(path)


def test_json_nested_too_deeply(tmp_path):
    deep = '{"question": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}'
    path = write_jsonl(tmp_path / "deep.jsonl", [GOOD_ROW, deep])
    with pytest.raises(ValueError, match=r"deep\.jsonl: line 2: JSON nested too deeply to read"):
        load_problems(path)
    array = tmp_path / "deep.json"
    array.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(ValueError, match=r"deep\.json: JSON nested too deeply to read"):
        load_problems(array)


def test_lone_surrogate_in_a_choice(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a\ud800", "b"], "answer": "A"}])
    with pytest.raises(ValueError, match=r"mc\.jsonl: line 1: a choice holds a lone surrogate '\\ud800'"):
        load_problems(path, preset="choice")


def test_train_refuses_a_bad_row_before_loading_a_model(tmp_path):
    from reval.config import TrainConfig
    from reval.train import train

    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_ROW, {"question": "x\ud800", "answer": "1"}])
    cfg = TrainConfig(out=tmp_path / "run", progress=False)
    cfg.task.data, cfg.model.path = str(path), str(tmp_path / "no-such-model")  # never reached
    with pytest.raises(ValueError, match=r"train\.jsonl: line 2: field 'question' holds a lone surrogate"):
        train(cfg)


def test_first_bad_row_and_count_of_others(tmp_path):
    rows = [GOOD_ROW, {"question": "q"}, "{broken", GOOD_ROW, {"answer": "1"}]
    path = write_jsonl(tmp_path / "many.jsonl", rows)
    with pytest.raises(ValueError, match=r"many\.jsonl: line 2: missing field 'answer'.*"
                                         r" \(and 2 more bad rows\)"):
        load_problems(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_problems(path, skip_bad_rows=True) == [Problem("q", "#### 1")] * 2
    assert len(caught) == 1 and "skipped 3 bad rows (first: line 2:" in str(caught[0].message)
    assert caught[0].filename == __file__  # the warning points at the caller, not at reval.data


def test_bad_rows_in_csv_count_data_rows(tmp_path):
    path = tmp_path / "gsm8k.csv"
    # The quoted answer spans two lines, so the bad row is data row 2 but starts on file line 4.
    path.write_text('question,answer\n"q1","work\n#### 1"\nq2,no hashes\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"gsm8k\.csv: row 2: field 'answer' has no final answer"):
        load_problems(path, preset="gsm8k")
    with pytest.raises(ValueError, match=r"gsm8k\.csv: row 1: missing field 'solution' "
                                         r"\(fields: \['answer', 'question'\]\)"):
        load_problems(path, preset="math", question_field="question")


def test_bad_rows_in_parquet_and_saved_dataset(tmp_path):
    frame = pd.DataFrame({"problem": ["a", "b", None], "answer": ["1", "2", "3"]})
    frame.to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"d\.parquet: row 3: field 'problem' must be a non-empty string, "
                                         r"got null"):
        load_problems(tmp_path / "d.parquet", preset="aime")
    datasets.DatasetDict({"test": datasets.Dataset.from_pandas(frame)}).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match=r"saved \(split 'test'\): row 3: field 'problem' must be"):
        load_problems(tmp_path / "saved", preset="aime", split="test")


def test_no_usable_rows(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"q": 1}, {"q": 2}])
    with pytest.raises(ValueError, match=r"all_bad\.jsonl: no usable rows \(2 bad rows, first: line 1: "
                                         r"missing"):
        load_problems(path, skip_bad_rows=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no usable rows$"):
        load_problems(empty)


def test_limit_first_keeps_first_usable_problems_and_stops_reading(tmp_path):
    rows = [{"question": f"q{i}", "answer": i} for i in range(5)] + ["{broken"]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    assert load_problems(path, limit=3, limit_mode="first") == [Problem(f"q{i}", str(i)) for i in range(3)]
    # The broken line lies past the limit, so it is never read.
    assert len(load_problems(path, limit=5, limit_mode="first")) == 5
    with pytest.raises(ValueError, match="line 6: not valid JSON"):
        load_problems(path, limit=6, limit_mode="first")
    # The random subsample (the default) draws from every row, so it reads and checks them all.
    with pytest.raises(ValueError, match="line 6: not valid JSON"):
        load_problems(path, limit=3)
    with pytest.raises(ValueError, match="limit must be a positive number"):
        load_problems(path, limit=0)
    with pytest.raises(ValueError, match=r"limit_mode 'last' is unknown; choose one of \('random', 'first'\)"):
        load_problems(path, limit=3, limit_mode="last")


# --- bad sources -----------------------------------------------------------------------------

def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'gsm9k'; choose one of "
                                         r"\['aime', 'choice', 'deepscaler', 'gsm8k', 'math', 'qa'\]"):
        load_problems("whatever.jsonl", preset="gsm9k")


def test_unknown_suffix(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("question,answer\n")
    with pytest.raises(ValueError, match=r"train\.txt: unsupported file type '\.txt'; "
                                         r"use \.jsonl .*\.parquet .*\.csv"):
        load_problems(path)


@pytest.mark.parametrize("source",
                         ["data/missing.jsonl", "./gsm8k", "/no/such/dir", "a/b/c", "missing.parquet",
                          "data/train.txt"])
def test_missing_path_is_not_sent_to_the_hub(monkeypatch, source):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the hub"))
    with pytest.raises(FileNotFoundError, match=rf"{source}: no such file or directory"):
        load_problems(source)


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"plain: not a dataset directory written by save_to_disk"):
        load_problems(tmp_path / "plain")


def test_unreadable_parquet_and_csv(tmp_path):
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"fake\.parquet: could not read as Parquet"):
        load_problems(tmp_path / "fake.parquet")
    (tmp_path / "latin1.csv").write_bytes(b"question,answer\ncaf\xe9,1\n")
    with pytest.raises(ValueError, match=r"latin1\.csv: not valid UTF-8"):
        load_problems(tmp_path / "latin1.csv")


def test_unsupported_source_type():
    with pytest.raises(TypeError, match="cannot load problems from a dict"):
        load_problems({"question": "q", "answer": "1"})


def test_a_list_of_rows_keeps_every_column():
    problems = load_problems([{"question": "q", "answer": "#### 1", "solution": "1", "id": 7}, {"question": "r"}],
                             preset="gsm8k", skip_bad_rows=True)
    assert problems == [Problem("q", "1")] and problems[0].columns == {"solution": "1", "id": 7}
    with pytest.raises(ValueError, match="list of rows: row 2: must be a mapping of field names"):
        load_problems([{"question": "q", "answer": "1"}, "not a row"])
