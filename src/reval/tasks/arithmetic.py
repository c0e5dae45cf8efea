"""The embedded task: multi-digit addition word problems with column-by-column work.

A problem is two numbers phrased as a short word problem. The reference solution adds
column by column, right to left, writing each column's sum, then the boxed answer:

    Q: Ann has 347 pens and gets 285 more. How many now?
    A: 7+5=12|4+8+1=13|3+2+1=6|\\boxed{632}

So the model must write several tokens of work before the answer, and the answer is
checked exactly by `verify`. `digits` is the difficulty knob (more digits, more carries).

The warm-start data (see `reval.pretrain`) is written by `solution(..., drop_carry=p)`:
with probability p a carry is silently dropped, the classic habit of a student who
forgets to "carry the one". That error is systematic, so reinforcement learning can fix
it, which is what this task is built to show.

Splits are deterministic: every problem comes from `random.Random(seed_of(split, i))`.
Evaluation always uses the validation and test sets of `EVAL_SEED`, whatever the run's
seed, and no training stream (any seed) emits a problem whose numbers appear in them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ("Ann", "Bob", "Cat", "Dan", "Eve", "Fay")
ITEMS = ("pens", "cards", "coins", "shells", "stamps", "books")
TEMPLATES = (
    "{name} has {a} {item} and gets {b} more. How many now?",
    "A box has {a} {item}. {name} adds {b}. How many now?",
    "{name} saw {a} {item}, then {b} more. How many in all?",
)
SPLIT_OFFSETS = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
EVAL_SEED = 0  # validation and test sets are fixed across run seeds
DROP_CARRY = 0.6  # the warm start's rate of dropped carries (reval pretrain --task add)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the exact final answer, as the verifier compares it
    a: int
    b: int


def make_problem(rng: random.Random, digits: int = 3) -> Problem:
    """One problem; both numbers have between 2 and `digits` digits."""
    lo, hi = 10, 10**digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    text = rng.choice(TEMPLATES).format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
    return Problem(question=text, answer=str(a + b), a=a, b=b)


def split(name: str, n: int, digits: int = 3, seed: int = 0) -> list[Problem]:
    """`n` problems of split `name` ("train", "validation" or "test"), deterministic in `seed`.

    Training problems never share their (a, b) pair with the first 10,000 validation or
    test problems of `EVAL_SEED` (the sets every run evaluates on), whatever `seed` is,
    so test accuracy measures generalisation.
    """
    if name not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {name!r}; choose one of {sorted(SPLIT_OFFSETS)}")
    base = seed * 10_000_000 + SPLIT_OFFSETS[name]
    held_out: set[tuple[int, int]] = set()
    if name == "train":
        for other in ("validation", "test"):
            held_out |= {(p.a, p.b) for p in split(other, 10_000, digits, EVAL_SEED)}
    out, i = [], 0
    while len(out) < n:
        p = make_problem(random.Random(base + i), digits)
        i += 1
        if (p.a, p.b) not in held_out:
            out.append(p)
    return out


def solution(a: int, b: int, rng: random.Random | None = None, drop_carry: float = 0.0) -> str:
    """Column-by-column work and boxed answer; each carry is dropped with prob `drop_carry`."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, digits_out, carry = [], [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if carry and rng is not None and rng.random() < drop_carry:
            carry = 0  # the systematic slip: forget to carry the one
        s = x + y + carry
        steps.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
        digits_out.append(str(s % 10))
        carry = s // 10
    if carry:
        digits_out.append("1")
    answer = "".join(reversed(digits_out)).lstrip("0") or "0"
    return "|".join(steps) + "|\\boxed{" + answer + "}"


def num_carries(a: int, b: int) -> int:
    """How many columns produce a carry: the number of chances to make the slip."""
    n, carry = 0, 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        n += carry
        a, b = a // 10, b // 10
    return n


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_LINE = re.compile(r"(?:^|\n)\s*(?:final answer|answer)\s*[:=]\s*([^\n]+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last `\\boxed{...}`, else an `Answer: ...` line.

    Returns None when there is no answer to check. Whitespace and a trailing period are
    stripped, and thousands separators ("1,234") removed, as in common math graders.
    """
    found = _BOXED.findall(text)
    if not found:
        found = _ANSWER_LINE.findall(text)
    if not found:
        return None
    ans = found[-1].strip().rstrip(".").replace(",", "").strip()
    return ans or None


def verify(completion: str, answer: str) -> bool:
    """Exact check of the extracted final answer against the reference answer."""
    got = extract_answer(completion)
    if got is None:
        return False
    if got == answer:
        return True
    try:  # "0632" or "632.0" name the same integer
        return float(got) == float(answer)
    except ValueError:
        return False
