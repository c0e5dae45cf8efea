"""Math word problems with verifiable answers (GSM8K, MATH, DeepScaleR, AIME-style data).

Answers are written as `\\boxed{...}` (the paper's prompt asks for it). This module holds
the pieces every math dataset shares: finding the last boxed expression in a text, and
the rewards `math_verify_reward` (equivalence checked by math-verify, imported on first
use) and `boxed_format_reward` (format shaping).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced.

    Returns None when there is no boxed expression or its braces never close.
    `\\boxed 5` (no braces, as some MATH solutions write it) gives "5".
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", i) and not text.startswith("{", i):  # "\boxed 5"
        rest = text[i + 1:]
        return rest.split("$")[0].split()[0] if rest.strip() else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


# ---------------------------------------------------------------------------------------
# Rewards (TRL signature: f(completions, **dataset_columns) -> list[float | None])

_INSTALL_HINT = 'math_verify_reward needs the math-verify package: pip install "math-verify[antlr4_13_2]" (a dependency of reval)'
_GOLD_CACHE: dict[str, tuple] = {}  # reference answer -> math-verify's parse of it
_GOLD_CACHE_SIZE = 10_000
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_ready = False  # math-verify imported, quieted and warmed up


def completion_text(completion) -> str:
    """A completion as text: TRL passes a string, or for chat data a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def boxed_format_reward(completions: list, **_) -> list[float | None]:
    """1.0 when the completion has a non-empty `\\boxed{...}` answer, else 0.0.

    A shaping reward: combine it with a correctness reward through weights, e.g.
    `score([math_verify_reward, boxed_format_reward], ..., weights=[1.0, 0.1])`.
    """
    return [1.0 if (last_boxed(completion_text(c)) or "").strip() else 0.0 for c in completions]


def _import_math_verify():
    """`math_verify`, imported on first use so that `import reval` works without it.

    The first call also warms it up: sympy imports much of itself (simplify, solvers)
    only at the first symbolic comparison, a few seconds that would otherwise count
    against the first such answer's time limit (and an import cut short by the limit).
    """
    global _ready
    try:
        import math_verify
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    if not _ready:
        # We pass parsing_timeout=None / timeout_seconds=None and enforce the limit with
        # reval.rewards.time_limit, so math-verify's "Timeout is disabled" warning is noise.
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(
                lambda record: not record.getMessage().startswith("Timeout is disabled"))
        for gold, pred in (("x^2+2x+1", "(x+1)^2"), ("1 \\le x < 3", "[1,3)")):
            math_verify.verify(_parse(math_verify, gold), _parse(math_verify, pred), timeout_seconds=None)
        _ready = True
    return math_verify


def _normalise(text: str) -> str:
    """For the string fallback: no spaces, `$`, `\\left`/`\\right` or trailing periods."""
    text = _LEFT_RIGHT.sub("", text.replace("\\$", "").replace("$", ""))
    return "".join(text.split()).rstrip(".")


def _clean(answer: str) -> str:
    """A boxed answer or reference, stripped of surrounding space and a final period."""
    return answer.strip().rstrip(".").strip()


def _parse(mv, text: str) -> list:
    """math-verify's parse of one bare answer, as `$...$` LaTeX, else as `\\boxed{...}`.

    (`$...$` reads "30°" and "3." that the boxed form misses; the boxed form is the
    fallback for the rare answer that `$` wrapping breaks, such as one holding a `$`.)
    """
    parsed = mv.parse(f"${text}$", parsing_timeout=None)
    if any(not isinstance(p, str) for p in parsed):
        return parsed
    boxed = mv.parse(f"\\boxed{{{text}}}", parsing_timeout=None)
    return boxed if any(not isinstance(p, str) for p in boxed) else parsed


def _grade(mv, completion, gold, limit) -> float | None:
    """1.0 / 0.0 for one completion against its reference (under `limit`, not yet entered)."""
    pred = last_boxed(completion_text(completion))
    if pred is None or not _clean(pred):
        return 0.0
    pred = _clean(pred)
    cached = _GOLD_CACHE.get(gold)
    with limit:
        gold_parsed = cached if cached is not None else tuple(_parse(mv, gold))
        if all(isinstance(p, str) for p in gold_parsed):
            # math-verify could not read the reference: compare normalised strings instead
            ok = _normalise(gold) == _normalise(pred)
        else:
            ok = mv.verify(list(gold_parsed), _parse(mv, pred), timeout_seconds=None)
    if limit.expired:  # math-verify catches exceptions, so the result may be a cut-short one
        return None
    if cached is None:
        if len(_GOLD_CACHE) >= _GOLD_CACHE_SIZE:
            _GOLD_CACHE.clear()
        _GOLD_CACHE[gold] = gold_parsed
    return 1.0 if ok else 0.0


def make_math_verify_reward(timeout: float | None = 5.0) -> Callable[..., list[float | None]]:
    """A `math_verify_reward` whose answers each get `timeout` seconds (None: no limit).

    For each completion the last `\\boxed{...}` is compared with the reference answer (the
    `answer` column) by math-verify (`parse` both, then `verify(gold, prediction)`), so
    `\\frac{1}{2}`, `0.5`, `1/2` and `\\dfrac12` all match, as do `1,234` and `1234`, or
    `10\\text{ cm}` and `10`. Scores: 1.0 equivalent, 0.0 not (or no boxed answer), None
    when the answer cannot be scored: its check ran past `timeout`, or the reference is
    missing. A reference that math-verify cannot parse is compared as a string, after
    removing spaces, `$`, `\\left` / `\\right` and trailing periods on both sides. A
    reference that itself holds a `\\boxed{...}` (a full solution) is reduced to it.

    The limit is `reval.rewards.time_limit` (math-verify's own signal-based timeouts are
    turned off, as they would cancel an outer limit such as `score(timeout=...)`'s), so it
    works on the main thread only; off it, answers are checked without a limit.
    math-verify is imported on the first call (or by `prepare()`, which
    `reval.rewards.resolve_rewards` calls), never when this module is imported.
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout = {timeout!r} is invalid: must be > 0 seconds, or None")

    def math_verify_reward(completions: list, answer: list, **_) -> list[float | None]:
        from reval.rewards import TimeLimitExceeded, time_limit  # (reval.rewards imports us)

        mv = _import_math_verify()
        out: list[float | None] = []
        for completion, gold in zip(completions, answer):
            gold = _clean(str(gold)) if gold is not None else ""
            if "\\boxed" in gold or "\\fbox" in gold:
                gold = _clean(last_boxed(gold) or "")
            if not gold:
                out.append(None)  # no reference: cannot score
                continue
            limit = time_limit(timeout)
            try:
                out.append(_grade(mv, completion, gold, limit))
            except TimeLimitExceeded as e:
                if e.limit is not limit or not limit.expired:
                    raise  # an outer limit (score's) ran out: stop the whole call
                out.append(None)
        return out

    math_verify_reward.__name__ = math_verify_reward.__qualname__ = "math_verify_reward"
    math_verify_reward.timeout = timeout
    math_verify_reward.prepare = _import_math_verify
    return math_verify_reward


math_verify_reward = make_math_verify_reward()
