"""The evaluation protocol: the seeded random --limit subsample, the multiple-choice preset
and its `multiple_choice` reward (item 6 of issue 11)."""

import json
import random

import pandas as pd
import pytest

from reval.config import TrainConfig
from reval.data import Problem, load_problems
from reval.rewards import REWARDS, score
from reval.tasks.choice import choice_letter, multiple_choice_reward


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def bench(tmp_path):
    """50 numbered problems: q0 .. q49, answers 0 .. 49."""
    return write_jsonl(tmp_path / "bench.jsonl", [{"question": f"q{i}", "answer": i} for i in range(50)])


def numbers(problems):
    return [int(p.answer) for p in problems]


# --- the --limit subsample -------------------------------------------------------------------

def test_random_limit_is_a_seeded_sample_in_file_order(bench):
    picked = numbers(load_problems(bench, limit=10))
    assert picked == sorted(random.Random(0).sample(range(50), 10))  # the documented draw, seed 0
    assert len(picked) == 10 and len(set(picked)) == 10
    assert picked == sorted(picked)  # file order
    assert picked != list(range(10))  # not the first rows
    assert numbers(load_problems(bench, limit=10)) == picked  # the same on every call
    assert numbers(load_problems(bench, limit=10, limit_seed=0)) == picked  # 0 is the default
    other = numbers(load_problems(bench, limit=10, limit_seed=1))
    assert other != picked and other == sorted(random.Random(1).sample(range(50), 10))


def test_first_limit_and_small_files(bench):
    assert numbers(load_problems(bench, limit=10, limit_mode="first")) == list(range(10))
    # A limit at or above the number of rows keeps them all, in order, in both modes.
    assert numbers(load_problems(bench, limit=50)) == list(range(50))
    assert numbers(load_problems(bench, limit=80, limit_mode="first")) == list(range(50))


def test_random_limit_draws_over_usable_rows_only(tmp_path):
    """Bad rows are skipped before the draw: 50 usable rows give the same sample as above."""
    rows = []
    for i in range(50):
        rows.append({"question": f"q{i}", "answer": i})
        if i % 7 == 3:
            rows.append({"question": "", "answer": 1})  # bad: empty question
    path = write_jsonl(tmp_path / "holes.jsonl", rows)
    with pytest.raises(ValueError, match=r"holes\.jsonl: line 5: field 'question' must be a non-empty"):
        load_problems(path, limit=10)
    with pytest.warns(UserWarning, match="skipped 7 bad rows"):
        picked = numbers(load_problems(path, limit=10, skip_bad_rows=True))
    assert picked == sorted(random.Random(0).sample(range(50), 10))


def test_eval_scores_two_models_on_the_same_random_rows(tiny_dir, tmp_path, monkeypatch):
    """`reval eval --limit` on two different models: the same subsample, and for --preset choice
    the multiple_choice verifier by default."""
    from reval import rewards
    from reval.cli import _eval
    from reval.model import build_char_tokenizer, build_tiny_model

    other_dir = tmp_path / "other"
    tok = build_char_tokenizer()
    build_tiny_model(len(tok), hidden=32, layers=2, heads=2, seed=1).save_pretrained(other_dir)
    tok.save_pretrained(other_dir)
    rows = [{"question": f"q{i}", "choices": ["x", "y", "z"], "answer": "ABC"[i % 3]} for i in range(30)]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    resolved = []
    real_resolve = rewards.resolve_rewards
    monkeypatch.setattr(rewards, "resolve_rewards", lambda names: resolved.append(list(names)) or real_resolve(names))

    items = []
    for model in (tiny_dir, other_dir):
        out = tmp_path / f"{model.name}.json"
        _eval(["--model", str(model), "--data", str(data), "--preset", "choice", "--limit", "5",
               "--max-new-tokens", "2", "--out", str(out)])
        items.append([(i["question"], i["answer"]) for i in json.loads(out.read_text())["mc"]["items"]])
    expected = [(p.question, p.answer) for p in load_problems(data, preset="choice", limit=5)]
    assert items[0] == items[1] == expected
    assert [q for q, _ in expected] != [f"q{i}\n\nA) x\nB) y\nC) z" for i in range(5)]  # not the first 5
    assert resolved == [["multiple_choice"], ["multiple_choice"]]
    with pytest.raises(ValueError, match=r"--limit-mode 'last': choose random or first"):
        _eval(["--data", str(data), "--limit", "5", "--limit-mode", "last"])


def test_train_evaluates_the_same_random_subsample(bench, tmp_path):
    from reval.loop.build import datasets as _datasets

    cfg = TrainConfig()
    cfg.task.data, cfg.task.eval_data, cfg.task.eval_limit = str(bench), (str(bench),), 10
    _, evals = _datasets(cfg, None, None)
    assert numbers(evals["bench"]) == sorted(random.Random(0).sample(range(50), 10))
    cfg.task.eval_limit_seed = 3
    assert numbers(_datasets(cfg, None, None)[1]["bench"]) == sorted(random.Random(3).sample(range(50), 10))
    cfg.task.eval_limit_mode = "first"
    assert numbers(_datasets(cfg, None, None)[1]["bench"]) == list(range(10))


def test_config_checks_the_new_fields():
    cfg = TrainConfig()
    cfg.task.eval_limit_mode = "last"
    with pytest.raises(ValueError, match=r"task\.eval_limit_mode = 'last' is invalid"):
        cfg.validate()
    cfg = TrainConfig()
    cfg.task.preset = "choice"
    with pytest.raises(ValueError, match=r"task\.rewards = \(\) is invalid: must be set for task\.preset "
                                         r"'choice' \(e\.g\. multiple_choice"):
        cfg.validate()
    cfg.task.rewards = ("multiple_choice",)
    cfg.validate()


# --- the choice preset -----------------------------------------------------------------------

def test_choice_rows_give_a_lettered_question_and_the_letter(tmp_path):
    rows = [
        {"question": "Which is a noble gas?", "choices": ["Oxygen", "Neon", "Iron"], "answer": "B"},
        {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": 3},  # MMLU: 0-based index
        {"question": "Capital of France?  ", "choices": ["Rome", " Paris ", "Oslo"], "answer": "Paris"},
        {"question": "Pick the letter.", "choices": ["B", "A"], "answer": "A"},  # a letter, not the text
    ]
    problems = load_problems(write_jsonl(tmp_path / "mc.jsonl", rows), preset="choice")
    assert problems == [
        Problem("Which is a noble gas?\n\nA) Oxygen\nB) Neon\nC) Iron", "B"),
        Problem("2 + 2 = ?\n\nA) 3\nB) 4\nC) 5\nD) 22", "D"),
        Problem("Capital of France?\n\nA) Rome\nB) Paris\nC) Oslo", "B"),
        Problem("Pick the letter.\n\nA) B\nB) A", "A"),
    ]
    # question_field / answer_field rename the question and answer fields
    renamed = [{"prompt": "Q?", "choices": ["a", "b"], "label": 1}]
    got = load_problems(write_jsonl(tmp_path / "r.jsonl", renamed), preset="choice", question_field="prompt",
                        answer_field="label")
    assert got == [Problem("Q?\n\nA) a\nB) b", "B")]


GPQA = [{"Record ID": f"rec{i}", "Question": f"Question number {i}?", "Correct Answer": f"right {i}",
         "Incorrect Answer 1": f"wrong {i}a", "Incorrect Answer 2": f"wrong {i}b",
         "Incorrect Answer 3": f"wrong {i}c", "Subdomain": "Physics"} for i in range(8)]


def test_gpqa_layout_shuffles_choices_deterministically(tmp_path):
    path = tmp_path / "gpqa_diamond.csv"
    pd.DataFrame(GPQA).to_csv(path, index=False)  # GPQA ships as CSV with these columns
    problems = load_problems(path, preset="choice")
    for row, p in zip(GPQA, problems):
        head, _, lines = p.question.partition("\n\n")
        assert head == row["Question"]
        choices = dict(line.split(") ", 1) for line in lines.split("\n"))
        assert list(choices) == ["A", "B", "C", "D"]
        assert sorted(choices.values()) == sorted(v for k, v in row.items() if "Answer" in k)
        assert choices[p.answer] == row["Correct Answer"]  # the reference letter is the right one
    # Pinned: the order must never change, or old and new scores stop being comparable.
    assert [p.answer for p in problems] == ["A", "C", "B", "B", "A", "A", "A", "B"]
    # The seed is the question text, not the row number: the same whatever the file order.
    reversed_ = load_problems(write_jsonl(tmp_path / "rev.jsonl", GPQA[::-1]), preset="choice")
    assert reversed_[::-1] == problems


# Each bad row goes on line 2, after a good one.
BAD_CHOICE_ROWS = [
    ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"},
     r"field 'answer' is 'E': expected a letter A-D, a 0-based index below 4 or the text of one of the 4"),
    ({"question": "q", "choices": [], "answer": "A"}, r"field 'choices' must be a list of 2 to 10 choices, got 0"),
    ({"question": "q", "choices": "a, b", "answer": "A"}, r"field 'choices' must be a list .* got 'a, b'"),
    ({"question": "q", "choices": ["a", " "], "answer": "A"},
     r"choice B in field 'choices' must be a non-empty string, got an empty string"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, r"field 'answer' is int '2': expected a letter A-B"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, r"field 'answer' is 'c': expected"),
    ({"question": "q", "choices": ["a", "a"], "answer": "a"}, r"field 'answer' is 'a': expected"),  # ambiguous
    ({"question": "", "choices": ["a", "b"], "answer": "A"}, r"field 'question' must be a non-empty string"),
    ({"question": "q", "answer": "A"}, r"missing field 'choices'"),
    ({"Question": "q", "Correct Answer": "a"}, r"missing field 'Incorrect Answer 1'"),
    ({"Question": "q", "Correct Answer": "", "Incorrect Answer 1": "b"},
     r"field 'Correct Answer' must be a non-empty string, got an empty string"),
]


@pytest.mark.parametrize("row, message", BAD_CHOICE_ROWS)
def test_bad_choice_row_names_file_and_line(tmp_path, row, message):
    good = {"question": "ok", "choices": ["a", "b"], "answer": "A"}
    path = write_jsonl(tmp_path / "mc.jsonl", [good, row])
    with pytest.raises(ValueError, match=rf"mc\.jsonl: line 2: {message}"):
        load_problems(path, preset="choice")
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        assert len(load_problems(path, preset="choice", skip_bad_rows=True)) == 1


# --- the multiple_choice reward --------------------------------------------------------------

COMPLETIONS = [  # (completion, letter read from it)
    ("The energy difference is 4.2 eV, matching option B.\n\nThe final answer is \\boxed{B}.", "B"),
    ("... so only neon is inert. $\\boxed{\\text{B}}$", "B"),
    ("Therefore the answer is \\boxed{(C)}", "C"),
    ("**Final Answer**\n\\[\n\\boxed{\\textbf{(D)}}\n\\]", "D"),
    ("I first guessed \\boxed{A}, but rechecking the units gives \\boxed{C}.", "C"),  # the last box
    ("The correct choice is \\boxed{B) 4.2 eV}", "B"),
    ("Lower case works alone: \\boxed{d}", "D"),
    ("Boxed the value instead: \\boxed{4.2 \\text{ eV}}\n\nAnswer: B", "B"),  # boxed has no letter
    ("Let me think.\nOption A fails, option C fails.\n\nAnswer: D", "D"),
    ("Comparing the spectra...\n**Answer:** (A)", "A"),
    ("So the answer is C.", "C"),
    ("Answer: A good start is to compute the energy.", None),  # "A" is a word here
    ("\\boxed{A + B}", None),  # algebra, not a letter
    ("\\boxed{C_6H_6}", None),
    ("The molecule is benzene.", None),
    ("", None),
]


@pytest.mark.parametrize("completion, letter", COMPLETIONS)
def test_choice_letter(completion, letter):
    assert choice_letter(completion) == letter


def test_multiple_choice_reward():
    completions = [c for c, _ in COMPLETIONS[:4]] + ["no answer at all", "Answer: B"]
    answer = ["B", "B", "A", "D", "B", " b "]
    assert multiple_choice_reward(completions, answer=answer) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    # chat-format completions (TRL passes a list of messages) and references that are no letter
    chat = [[{"role": "assistant", "content": "\\boxed{C}"}]]
    assert multiple_choice_reward(chat, answer=["C"]) == [1.0]
    assert multiple_choice_reward(["\\boxed{C}"] * 3, answer=["", None, "CD"]) == [None, None, None]
    assert REWARDS["multiple_choice"] is multiple_choice_reward
    assert score([REWARDS["multiple_choice"]], ["\\boxed{A}", "\\boxed{B}"], {"answer": ["A", "A"]}) == ([1.0, 0.0], 0)
