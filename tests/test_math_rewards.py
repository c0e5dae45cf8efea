"""Math rewards (math-verify), the nestable signal-based `time_limit`, `score` and the registry."""

import signal
import subprocess
import sys
import threading
import time

import pytest

from reval.rewards import (REWARDS, correctness_reward, resolve_rewards, score,
                           time_limit)
from reval.tasks.math import boxed_format_reward, make_math_verify_reward, math_verify_reward

POSIX = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")


@pytest.fixture(autouse=True)
def alarm_state_is_restored():
    """Every test must leave SIGALRM's handler as it found it and no timer armed."""
    before = signal.getsignal(signal.SIGALRM)
    yield
    if hasattr(signal, "setitimer"):
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) == before


@pytest.fixture()
def mv():
    return pytest.importorskip("math_verify")


def spin(seconds):
    """Pure-Python busy work (what sympy does), interruptible by a signal handler."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


_patient = make_math_verify_reward(timeout=60)  # the tables test math, not speed (CI may be loaded)


def grade(gold, pred):
    return _patient([f"so the answer is \\boxed{{{pred}}}"], answer=[gold])[0]


# ---------------------------------------------------------------------------------------
# math_verify_reward: what math-verify 0.9 does with typical answers (checked by hand)

EQUIVALENT = [
    ("42", "42"), ("-3", "-3"), ("-3", "−3"), ("0", "-0"),
    ("1,234", "1234"), ("1234", "1,234"), ("1000000", "1,000,000"), ("1{,}234", "1234"),
    ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "1/2"), ("\\frac{1}{2}", "\\dfrac12"),
    ("\\frac{1}{2}", "\\tfrac{1}{2}"), ("0.5", "\\frac12"), ("1/2", "2/4"), ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("\\frac{\\sqrt2}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("2\\sqrt{3}", "\\sqrt{12}"), ("\\frac{1}{2}", "\\left(\\frac{1}{2}\\right)"),
    ("1/3", "0.333333"), ("\\pi", "3.14159265"), ("2^{10}", "1024"), ("10^{-3}", "0.001"),
    ("10", "10\\text{ cm}"), ("10", "10 \\text{cm}"), ("10", "10\\,\\text{cm}"), ("10", "10 cm"),
    ("10\\text{ cm}", "10"), ("5", "5\\text{ m}^2"), ("5", "\\$5"), ("\\$1,234.56", "1234.56"),
    ("5", "5.0"), ("5", "05"), ("3", "3."), ("3", "x = 3"), ("x=3", "3"),
    ("50\\%", "50\\%"), ("50\\%", "50"), ("50", "50\\%"), ("50\\%", "0.5"),  # % is lenient
    ("30", "30^\\circ"), ("30", "30^{\\circ}"), ("30^\\circ", "30"), ("30", "30°"),
    ("[1,2)", "[1,2)"), ("(-\\infty, 3]", "(-\\infty,3]"), ("(1,2)", "\\left(1, 2\\right)"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("1,2", "2,1"), ("x \\in [0,1]", "[0,1]"),
    ("x^2+2x+1", "(x+1)^2"), ("1+i", "i+1"), ("\\text{(A)}", "A"), ("\\text{even}", "even"),
    ("\\frac{3}{4}", "\\frac{6}{8}"),
]

NOT_EQUIVALENT = [
    ("42", "43"), ("-3", "3"), ("1,234", "1.234"), ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("\\frac{1}{2}", "0.50\\%"), ("\\frac{\\sqrt{2}}{2}", "0.7071"),  # 6 decimals needed
    ("\\sqrt{2}", "1.4142"), ("1/3", "0.33"), ("3.14", "\\pi"),
    ("[1,2)", "[1,2]"), ("(1,2)", "(1,2]"), ("(1,2)", "(2,1)"), ("x+1", "y+1"),
    ("\\frac{\\pi}{6}", "30^\\circ"),  # degrees are dropped, not converted to radians
    ("4", "four"), ("\\text{even}", "\\text{odd}"),
    # not supported by math-verify 0.9 (they are equal, but score 0):
    ("1e3", "1000"), ("12", "\\text{12 dollars}"), ("\\infty", "\\text{infinity}"),
]


@pytest.mark.parametrize("gold,pred", EQUIVALENT)
def test_equivalent_answers_score_one(mv, gold, pred):
    assert grade(gold, pred) == 1.0


@pytest.mark.parametrize("gold,pred", NOT_EQUIVALENT)
def test_different_answers_score_zero(mv, gold, pred):
    assert grade(gold, pred) == 0.0


def test_quirks_math_verify_accepts(mv):
    """Documented, arguably loose: an open interval equals the set of its ends, and a
    ratio "10:30" reads as 1/3. These come from math-verify, not from reval."""
    assert grade("(3, 4)", "3, 4") == 1.0
    assert grade("10:30", "1/3") == 1.0


def test_extraction_no_box_nesting_and_columns(mv):
    comps = [
        "The answer is 5.",  # no boxed answer
        "\\boxed{5",  # braces never close
        "\\boxed{}",  # empty box
        "first \\boxed{4}, then \\boxed{5}",  # the last one counts
        "\\boxed{\\frac{\\sqrt{2}}{\\sqrt{\\left(4\\right)}}}",  # nested braces
        "\\boxed{\\boxed{5}}",
        "\\fbox{5}",
        [{"role": "assistant", "content": "it is \\boxed{5}"}],  # TRL conversational format
    ]
    out = math_verify_reward(comps, answer=["5", "5", "5", "5", "\\frac{\\sqrt{2}}{2}", "5", "5", "5"],
                             prompts=["p"] * 8, extra_column=list(range(8)))
    assert out == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_reference_forms(mv):
    comps = ["\\boxed{7}"] * 5
    answers = [7, None, "  ", "Adding gives $\\boxed{7}$.", "7."]  # int, missing, blank, solution, period
    assert math_verify_reward(comps, answer=answers) == [1.0, None, None, 1.0, 1.0]


def test_unparseable_reference_falls_back_to_normalised_strings(mv):
    # math-verify parses neither "p \implies q" nor "a \to b" into sympy
    assert mv.parse("$p \\implies q$", parsing_timeout=None) == ["p \\implies q"]
    comps = ["\\boxed{p\\implies q.}", "\\boxed{$q \\implies p$}", "\\boxed{ a \\to b }"]
    assert math_verify_reward(comps, answer=["p \\implies q", "p \\implies q", "a\\to b"]) == [1.0, 0.0, 1.0]


def test_math_verify_reward_works_off_the_main_thread(mv):
    """No signals there: math-verify's own timeouts are off, so nothing raises (and no limit)."""
    result = {}
    t = threading.Thread(target=lambda: result.update(
        out=math_verify_reward(["\\boxed{\\frac12}", "\\boxed{2}"], answer=["0.5", "3"])))
    t.start()
    t.join()
    assert result["out"] == [1.0, 0.0]


def test_boxed_format_reward():
    comps = ["\\boxed{3}", "3", "\\boxed{}", "\\boxed{x", [{"role": "assistant", "content": "\\boxed{1}"}]]
    assert boxed_format_reward(comps, answer=["3"] * 5) == [1.0, 0.0, 0.0, 0.0, 1.0]


# ---------------------------------------------------------------------------------------
# per-answer time limit


@POSIX
def test_a_hanging_check_is_none_and_the_others_are_scored(mv, monkeypatch):
    real = mv.verify

    def verify(gold, target, **kw):
        if "999" in str(gold):
            while True:  # pure-Python hang, like a runaway sympy simplify
                pass
        return real(gold, target, **kw)

    monkeypatch.setattr(mv, "verify", verify)
    reward = make_math_verify_reward(timeout=0.05)
    assert reward.__name__ == "math_verify_reward"
    start = time.monotonic()
    out = reward(["\\boxed{1}", "\\boxed{999}", "\\boxed{2}", "\\boxed{999}"], answer=["1", "999", "3", "999"])
    assert out == [1.0, None, 0.0, None]
    assert time.monotonic() - start < 1.0


@POSIX
def test_a_check_that_swallows_the_timeout_is_still_none(mv, monkeypatch):
    """math-verify catches Exception everywhere; the re-fired alarm and `expired` still win."""
    interruptions = []

    def verify(gold, target, **kw):
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            try:
                spin(1)
            except Exception:  # noqa: BLE001 - like math-verify's own handlers
                interruptions.append(1)
        return True

    monkeypatch.setattr(mv, "verify", verify)
    assert make_math_verify_reward(timeout=0.05)(["\\boxed{1}"], answer=["1"]) == [None]
    assert len(interruptions) >= 2  # fired again after being swallowed


@POSIX
def test_a_timed_out_reference_parse_is_not_cached(mv, monkeypatch):
    real = mv.parse
    calls = {"n": 0}

    def parse(text, **kw):
        calls["n"] += 1
        if calls["n"] == 1:  # the first parse (of the reference) hangs, then math-verify
            try:  # swallows the error and returns nothing, as it would
                spin(10)
            except Exception:  # noqa: BLE001
                return []
        return real(text, **kw)

    monkeypatch.setattr(mv, "parse", parse)
    reward = make_math_verify_reward(timeout=0.05)
    gold = "\\frac{7}{13}"
    assert reward(["\\boxed{7/13}"], answer=[gold]) == [None]
    assert reward(["\\boxed{7/13}"], answer=[gold]) == [1.0]  # not cached as "unparseable"


def test_factory_rejects_bad_timeouts():
    with pytest.raises(ValueError, match="timeout"):
        make_math_verify_reward(timeout=0)
    assert make_math_verify_reward(timeout=None).timeout is None


# ---------------------------------------------------------------------------------------
# time_limit


@POSIX
def test_time_limit_interrupts_pure_python():
    start = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        with time_limit(0.05) as limit:
            spin(5)
    assert err.value.limit is limit and limit.expired
    assert time.monotonic() - start < 0.5
    with time_limit(1) as limit:  # finishes in time: nothing raised, nothing left armed
        spin(0.01)
    assert not limit.expired


@POSIX
def test_inner_shorter_than_outer_fires_inner_and_rearms_outer():
    with time_limit(2) as outer:
        with pytest.raises(TimeoutError) as err:
            with time_limit(0.05) as inner:
                spin(5)
        assert err.value.limit is inner and inner.expired
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 1.0 < left <= 2  # the outer timer is back, with what was left of it
        assert signal.getsignal(signal.SIGALRM) == outer._on_alarm
    assert not outer.expired


@POSIX
def test_outer_deadline_during_inner_fires_outer():
    start = time.monotonic()
    with pytest.raises(TimeoutError) as err:
        with time_limit(0.05) as outer:
            with time_limit(5) as inner:  # armed for the outer's earlier deadline
                spin(5)
    assert err.value.limit is outer and outer.expired and not inner.expired
    assert time.monotonic() - start < 0.5


@POSIX
def test_outer_deadline_passed_in_an_inner_block_that_swallowed_it_still_fires_outer():
    caught = []
    with pytest.raises(TimeoutError) as err:
        with time_limit(0.05) as outer:
            with time_limit(5):
                try:
                    time.sleep(0.2)
                except TimeoutError:
                    caught.append(1)
            spin(5)  # not reached: the outer error comes as the inner block exits
    assert caught and err.value.limit is outer


@POSIX
def test_a_foreign_outer_timer_is_honoured_and_rearmed():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(time.monotonic()))
    try:
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(TimeoutError):
            with time_limit(0.05):
                spin(5)
        assert not fired
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0.1 < left <= 0.25
        time.sleep(0.4)  # the foreign handler does not raise; sleep resumes after it
        assert len(fired) == 1 and fired[0] - start >= 0.29
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_time_limit_is_a_no_op_off_the_main_thread_or_for_none():
    result = {}

    def worker():
        with time_limit(0.01) as limit:
            time.sleep(0.1)
        result["limit"] = limit

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not result["limit"].expired and not result["limit"].active
    with time_limit(None) as limit:
        time.sleep(0.05)
    assert not limit.active


# ---------------------------------------------------------------------------------------
# score


@POSIX
def test_score_interrupts_a_hanging_reward_without_leaking_a_thread():
    def hangs(completions, **_):
        while True:
            pass

    threads = threading.active_count()
    start = time.monotonic()
    rewards, failures = score([hangs, correctness_reward], ["\\boxed{3}", "\\boxed{4}"],
                              {"answer": ["3", "3"]}, timeout=0.1)
    assert time.monotonic() - start < 1.0
    assert rewards == [None, None] and failures == 2
    assert threading.active_count() == threads
    rewards, failures = score([correctness_reward], ["\\boxed{3}"], {"answer": ["3"]}, timeout=0.1)
    assert rewards == [1.0] and failures == 0


@POSIX
def test_score_distrusts_a_reward_that_swallowed_its_timeout():
    def stubborn(completions, **_):
        try:
            spin(5)
        except Exception:  # noqa: BLE001
            pass
        return [1.0] * len(completions)

    assert score([stubborn], ["a"], {}, timeout=0.05) == ([None], 1)


@POSIX
def test_score_limit_cuts_through_per_answer_limits(mv, monkeypatch):
    """score's deadline passes inside the third answer's check: the whole call ends then; each
    answer is then checked alone, under the shorter of its own limit and score's."""
    monkeypatch.setattr(mv, "verify", lambda *a, **k: spin(60))
    reward = make_math_verify_reward(timeout=0.1)
    reward(["\\boxed{1}"] * 0, answer=[])  # import math-verify outside the timed window
    start = time.monotonic()
    rewards, failures = score([reward], ["\\boxed{1}"] * 6, {"answer": ["1"] * 6}, timeout=0.25)
    assert rewards == [None] * 6 and failures == 6
    assert time.monotonic() - start < 0.25 + 6 * 0.1 + 0.3  # not 0.25 + 6 * 0.25 s


@POSIX
def test_a_time_limit_around_score_is_not_swallowed_by_it():
    def slow(completions, **_):
        spin(5)
        return [1.0]

    with pytest.raises(TimeoutError) as err:
        with time_limit(0.05) as outer:
            score([slow], ["a"], {}, timeout=10)
    assert err.value.limit is outer


def test_score_off_the_main_thread_uses_the_thread_fallback():
    def naps(completions, **_):
        time.sleep(0.3)
        return [1.0]

    result = {}
    t = threading.Thread(target=lambda: result.update(out=score([naps], ["a"], {}, timeout=0.05)))
    t.start()
    t.join()
    assert result["out"] == ([None], 1)


def test_score_combines_math_verify_and_boxed_format_with_weights(mv):
    comps = ["\\boxed{\\frac{1}{2}}", "\\boxed{3}", "0.5", "\\boxed{0.5}"]
    rewards, failures = score([REWARDS["math_verify"], REWARDS["boxed_format"]], comps,
                              {"answer": ["0.5", "0.5", "0.5", None]}, weights=[1.0, 0.1], timeout=10)
    assert rewards == [pytest.approx(1.1), pytest.approx(0.1), 0.0, None] and failures == 1


# ---------------------------------------------------------------------------------------
# registry and optional dependency


def test_registry_and_unknown_names(mv):
    assert set(REWARDS) == {"arithmetic", "math_verify", "boxed_format", "multiple_choice"}
    assert resolve_rewards(["math_verify", "boxed_format", "arithmetic"]) == [
        math_verify_reward, boxed_format_reward, correctness_reward]
    assert resolve_rewards([]) == []
    with pytest.raises(ValueError, match="'mathverify'.*known: arithmetic, boxed_format, math_verify"):
        resolve_rewards(["math_verify", "mathverify"])


def test_missing_math_verify_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import math_verify -> ImportError
    with pytest.raises(ImportError, match=r'pip install "math-verify\[antlr4_13_2\]"'):
        math_verify_reward(["\\boxed{1}"], answer=["1"])
    with pytest.raises(ImportError, match=r"math-verify"):
        resolve_rewards(["math_verify"])
    assert resolve_rewards(["boxed_format"]) == [boxed_format_reward]


def test_importing_reval_rewards_does_not_import_math_verify():
    for first in ("reval.rewards", "reval.tasks.math"):  # either import order works
        code = (f"import sys, {first}, reval.rewards; "
                "assert 'math_verify' not in sys.modules and 'sympy' not in sys.modules")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
