"""The second embedded task: 2-digit by 2-digit multiplication with partial products.

Harder than addition and built so that RL has many things to improve, not one: the
answer (about 78 characters) works out both partial products digit by digit, then adds
them column by column:

    Q: Ann packs 47 boxes of 36 pens. How many pens?
    A: 7*6=42|4*6+4=28|282|7*3=21|4*3+2=14|1410|2+0=2|8+1=9|2+4=6|0+1=1|\\boxed{1692}

The warm start (`reval pretrain --task mul`) learns from solutions with two kinds of
systematic, fixable mistakes, at different rates:

1. **Multiplication-fact slips** (`SLIPS`): 23 of the 45 single-digit facts from 2*2 to
   9*9 are sometimes recalled wrong, each as one fixed wrong product (7*8=54), at its
   own rate between 0.1 and 0.7. Greedy decoding gets the facts slipped more than half
   the time wrong; sampling gets each right at its own rate. Facts are fixed one by one
   (each needs problems that use it), so accuracy rises gradually, not in one step.
2. **Dropped carries** inside a partial product: a carry of 4 or more is dropped with
   probability 0.6 (greedy drops it), a smaller one with 0.05; a carry in the final
   column addition is dropped with probability 0.05.

A slip is written consistently (7*8=54 carries 5 and writes 4), so the rest of the
solution is worked correctly from the wrong value, as a person would. `error_kinds`
finds the first wrong step of a completion and names its kind.

Splits: every unordered pair {a, b} belongs to one split by a fixed hash (70% train,
15% validation, 15% test), so no training problem shares its numbers (in either order)
with any validation or test problem, for any seed and any number of problems.
"""

from __future__ import annotations

import hashlib
import random
import re

from reval.tasks.arithmetic import ITEMS, NAMES, Problem

TEMPLATES = (
    "{name} packs {a} boxes of {b} {item}. How many {item}?",
    "A shop has {a} shelves of {b} {item}. How many {item}?",
    "{name} buys {a} bags of {b} {item}. How many {item} in all?",
)
LOW, HIGH = 12, 99  # both factors have two digits
SPLIT_SHARES = (("train", 0.70), ("validation", 0.15), ("test", 0.15))
SPLIT_OFFSETS = {"train": 0, "validation": 1_000_000, "test": 2_000_000}

# Unordered digit pair -> (the wrong product the warm start writes, how often it does).
SLIPS: dict[tuple[int, int], tuple[int, float]] = {
    (6, 7): (48, 0.70), (7, 8): (54, 0.70), (8, 9): (63, 0.65), (6, 8): (46, 0.65),
    (7, 9): (56, 0.60), (8, 8): (68, 0.60), (3, 6): (24, 0.60), (4, 6): (28, 0.55),
    (4, 8): (36, 0.55), (6, 6): (32, 0.55), (3, 9): (24, 0.55), (5, 7): (30, 0.55),
    (2, 9): (16, 0.55), (4, 7): (24, 0.25), (6, 9): (56, 0.25), (5, 8): (45, 0.25),
    (3, 8): (27, 0.20), (4, 9): (32, 0.20), (4, 4): (12, 0.20), (7, 7): (47, 0.15),
    (3, 7): (28, 0.15), (2, 7): (12, 0.15), (5, 9): (40, 0.10),
}
BIG_CARRY = 4  # carries of at least this size inside a partial product are dropped more often
DROP_BIG_CARRY, DROP_SMALL_CARRY, DROP_ADD_CARRY = 0.6, 0.05, 0.05


def split_of(a: int, b: int) -> str:
    """The split that owns the unordered pair {a, b} (a fixed hash, the same for every seed)."""
    lo, hi = sorted((a, b))
    u = int(hashlib.sha256(f"{lo}*{hi}".encode()).hexdigest()[:8], 16) / 16**8
    for name, share in SPLIT_SHARES:
        if u < share:
            return name
        u -= share
    return SPLIT_SHARES[-1][0]


def make_problem(rng: random.Random) -> Problem:
    a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
    text = rng.choice(TEMPLATES).format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
    return Problem(question=text, answer=str(a * b), a=a, b=b)


def split(name: str, n: int, seed: int = 0) -> list[Problem]:
    """`n` problems of split `name`, deterministic in `seed`; pairs never cross splits."""
    if name not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {name!r}; choose one of {sorted(SPLIT_OFFSETS)}")
    base = seed * 10_000_000 + SPLIT_OFFSETS[name]
    out, i = [], 0
    while len(out) < n:
        p = make_problem(random.Random(base + i))
        i += 1
        if split_of(p.a, p.b) == name:
            out.append(p)
    return out


def _slip(p: float, rng: random.Random | None) -> bool:
    return rng is not None and rng.random() < p


def _fact(x: int, y: int, rng: random.Random | None) -> int:
    wrong = SLIPS.get((min(x, y), max(x, y)))
    return wrong[0] if wrong and _slip(wrong[1], rng) else x * y


def _partial(a: int, d: int, rng: random.Random | None) -> tuple[list[str], int]:
    """Steps of a * d (d one digit), units first, and the (possibly wrong) product."""
    steps, digits, carry = [], [], 0
    for x in map(int, reversed(str(a))):
        if carry and _slip(DROP_BIG_CARRY if carry >= BIG_CARRY else DROP_SMALL_CARRY, rng):
            carry = 0  # forgot the carry
        s = _fact(x, d, rng) + carry
        steps.append(f"{x}*{d}+{carry}={s}" if carry else f"{x}*{d}={s}")
        digits.append(s % 10)
        carry = s // 10
    text = (str(carry) if carry else "") + "".join(map(str, reversed(digits)))
    return steps, int(text)


def _column_sum(x: int, y: int, rng: random.Random | None) -> tuple[list[str], int]:
    da, db = str(x)[::-1], str(y)[::-1]
    steps, digits, carry = [], [], 0
    for i in range(max(len(da), len(db))):
        u, v = (int(da[i]) if i < len(da) else 0), (int(db[i]) if i < len(db) else 0)
        if carry and _slip(DROP_ADD_CARRY, rng):
            carry = 0
        s = u + v + carry
        steps.append(f"{u}+{v}+1={s}" if carry else f"{u}+{v}={s}")
        digits.append(s % 10)
        carry = s // 10
    if carry:
        digits.append(1)
    return steps, int("".join(map(str, reversed(digits))))


def solution(a: int, b: int, rng: random.Random | None = None) -> str:
    """The worked solution of a * b; with `rng`, the warm start's mistakes at their rates."""
    units_steps, units = _partial(a, b % 10, rng)
    tens_steps, tens = _partial(a, b // 10, rng)
    add_steps, total = _column_sum(units, tens * 10, rng)
    parts = [*units_steps, str(units), *tens_steps, str(tens * 10), *add_steps]
    return "|".join(parts) + "|\\boxed{" + str(total) + "}"


ERROR_KINDS = ("fact_slip", "dropped_carry", "addition", "other")
_MUL_STEP = re.compile(r"^(\d)\*(\d)(?:\+(\d))?=(\d+)$")
_ADD_STEP = re.compile(r"^(\d)\+(\d)(?:\+1)?=(\d+)$")


def error_kind(completion: str, a: int, b: int) -> str | None:
    """None if the completion's boxed answer is right, else the kind of its first wrong step.

    Walks the completion's steps against the correct solution: a multiplication step
    with the right digits but a wrong product is a `fact_slip` (one of `SLIPS` or not);
    one that omits or alters the carry the previous step produced is a `dropped_carry`;
    a wrong column sum is `addition`; anything else (format, copying, a wrong final
    box) is `other`.
    """
    from reval.tasks.arithmetic import verify

    if verify(completion, str(a * b)):
        return None
    got, want = completion.split("|"), solution(a, b).split("|")
    for g, w in zip(got, want):
        if g == w:
            continue
        mg, mw = _MUL_STEP.match(g), _MUL_STEP.match(w)
        if mg and mw and mg.group(1, 2) == mw.group(1, 2):
            if (mg.group(3) or "0") != (mw.group(3) or "0"):
                return "dropped_carry"
            return "fact_slip"
        ag, aw = _ADD_STEP.match(g), _ADD_STEP.match(w)
        if ag and aw and ag.group(1, 2) == aw.group(1, 2):
            return "addition"
        return "other"
    return "other"


def mistake_rates(model, tokenizer, problems: list[Problem], *, samples: int = 8,
                  max_new_tokens: int = 112) -> dict[str, dict[str, float]]:
    """Share of answers by `error_kind` (None = correct), greedy and over `samples` samples."""
    from reval.model import format_prompt
    from reval.rollout import generate

    out = {}
    for mode, n in (("greedy", 1), (f"sampled@{samples}", samples)):
        kinds = []
        for start in range(0, len(problems), 64):
            chunk = problems[start:start + 64]
            res = generate(model, tokenizer, [format_prompt(tokenizer, p.question) for p in chunk],
                           samples_per_prompt=n, greedy=n == 1, max_new_tokens=max_new_tokens)
            texts = tokenizer.batch_decode(res.response_ids, skip_special_tokens=True)
            kinds += [error_kind(t, chunk[i // n].a, chunk[i // n].b) for i, t in enumerate(texts)]
        out[mode] = {str(k): round(kinds.count(k) / len(kinds), 4) for k in (None, *ERROR_KINDS)}
    return out
