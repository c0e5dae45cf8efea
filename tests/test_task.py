"""Task generation, splits, worked solutions, the verifier, and the tokenizer."""

import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reval.model import build_char_tokenizer
from reval.tasks.arithmetic import extract_answer, num_carries, solution, split, verify


def test_splits_deterministic_and_disjoint():
    assert split("test", 50) == split("test", 50)
    assert split("test", 50, seed=1) != split("test", 50)
    test_pairs = {(p.a, p.b) for p in split("test", 10_000)}
    assert not test_pairs & {(p.a, p.b) for p in split("train", 3000)}
    # Every run evaluates on the seed-0 sets: no training seed may draw their problems.
    for seed in (1, 2):
        assert not test_pairs & {(p.a, p.b) for p in split("train", 3000, seed=seed)}
        two_digit = {(p.a, p.b) for p in split("test", 10_000, digits=2)}
        assert not two_digit & {(p.a, p.b) for p in split("train", 3000, digits=2, seed=seed)}
    with pytest.raises(ValueError, match="unknown split"):
        split("dev", 3)


def test_correct_solution_verifies_and_slip_is_wrong():
    for p in split("validation", 300):
        sol = solution(p.a, p.b)
        assert verify(sol, p.answer), sol
        slip = solution(p.a, p.b, random.Random(0), drop_carry=1.0)
        assert verify(slip, p.answer) == (num_carries(p.a, p.b) == 0 or slip == sol)
    assert solution(347, 285) == "7+5=12|4+8+1=13|3+2+1=6|\\boxed{632}"
    assert solution(999, 1) == "9+1=10|9+0+1=10|9+0+1=10|\\boxed{1000}"


@pytest.mark.parametrize("text,expected", [
    ("work|\\boxed{632}", "632"),
    ("\\boxed{1} then \\boxed{2}", "2"),  # the last box counts
    ("\\boxed{ 1,234. }", "1234"),
    ("so\nAnswer: 77", "77"),
    ("Final answer = 5.", "5"),
    ("no answer here", None),
    ("\\boxed{}", None),
    ("\\boxed{12", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_verify_edge_cases():
    assert verify("\\boxed{0632}", "632") and verify("\\boxed{632.0}", "632")
    assert not verify("\\boxed{633}", "632") and not verify("\\boxed{abc}", "632")
    assert not verify("632", "632")  # a bare number is not an answer


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text())
def test_extract_answer_never_crashes(text):
    out = extract_answer(text)
    assert out is None or (isinstance(out, str) and out == out.strip() and out)
    assert isinstance(verify(text, "12"), bool)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126)) | st.sampled_from(["a\nb", " x "]))
def test_tokenizer_round_trip(text):
    assume(not any(special in text for special in ("<pad>", "<eos>", "<unk>")))
    tok = build_char_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text


def test_special_token_strings_are_special():
    """As in HF tokenizers generally: the literal text of a special token is that token."""
    tok = build_char_tokenizer()
    assert tok("<eos>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]


def test_tokenizer_round_trip_after_save(tmp_path):
    from reval.model import load_tokenizer

    build_char_tokenizer().save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    text = "Q: Ann has 12 pens.\nA: 2+1=3|\\boxed{3}"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
