"""Multiple-choice questions answered with a letter (GPQA-Diamond, MMLU-style data).

`reval.data`'s "choice" preset turns a row into a question followed by lettered choices
("A) ...", "B) ...", built by `lettered_question`) and a reference letter. The reward
`multiple_choice_reward` reads the letter a completion ends on and compares it with the
reference:

    multiple_choice_reward(["... so the answer is \\\\boxed{B}."], answer=["B"])   # [1.0]

Where the letter is read from, in order:

1. the last `\\boxed{...}`: `\\boxed{B}`, `\\boxed{(B)}`, `\\boxed{\\text{B}}`, `\\boxed{\\textbf{B}}`,
   `\\boxed{B) 4.2 eV}`; a lone lower-case letter (`\\boxed{b}`) counts too;
2. when there is no boxed answer, or it holds no letter (`\\boxed{4.2 eV}`), the last
   "Answer: B" (also "**Answer:** (B)", "the answer is B.", "Final answer: B"); a capital
   followed by a lower-case word ("Answer: A good guess is ...") is a word, not a letter;
3. else none: 0.0. A boxed choice text is not matched against the choices: the model
   is asked for a letter.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from reval.tasks.math import completion_text, last_boxed

LETTERS = "ABCDEFGHIJ"
"""Choice letters: at most 10 choices."""


def lettered_question(question: str, choices: Sequence[str]) -> str:
    """The question, a blank line and one "A) choice" line per choice, so a letter can answer it."""
    lines = [f"{LETTERS[i]}) {choice}" for i, choice in enumerate(choices)]
    return question.strip() + "\n\n" + "\n".join(lines)


# \text{B}, \textbf{(B)}, \mathrm{B}, ...: keep the argument.
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
# "B", "(B)", "B.", "B)", "(B) 4.2 eV", "B: ..."; text after the letter only behind ")", "." or
# ":", so "A + B" is no letter. A capital: "a cat" must not read as A.
_BOXED_LETTER = re.compile(rf"\(?([{LETTERS}])(?:[).:]+(?:\s.*)?)?", re.S)
_LONE_LETTER = re.compile(rf"\(?([{LETTERS.lower()}])\)?\.?")
# "Answer: B", "**Answer:** (B)", "the answer is B." A capital followed by a lower-case word on
# the same line is a word ("Answer: A good guess", "Answer: I think"), not a letter.
_ANSWER_LINE = re.compile(rf"(?i:answer)[\s:*]*(?:(?i:is)[\s:*]*)?\$?\(?([{LETTERS}])(?![\w'])(?![ \t]+[a-z])")


def choice_letter(completion) -> str | None:
    """The answer letter a completion ends on (see the module doc), or None."""
    text = completion_text(completion)
    boxed = last_boxed(text)
    if boxed is not None:
        inner = boxed
        for _ in range(3):  # \textbf{\text{B}} nests
            inner = _LATEX_WRAPPER.sub(r"\1", inner)
        inner = inner.replace("$", "").replace("{", "").replace("}", "").strip()
        match = _BOXED_LETTER.fullmatch(inner) or _LONE_LETTER.fullmatch(inner)
        if match:
            return match.group(1).upper()
    answers = _ANSWER_LINE.findall(text)
    return answers[-1] if answers else None


def multiple_choice_reward(completions: list, answer: list, **_) -> list[float | None]:
    """1.0 when the completion's answer letter equals the reference letter, else 0.0.

    None (skipped, not wrong) when the reference is not a letter A-J: a data error, which
    `reval.data`'s "choice" preset never produces.
    """
    out: list[float | None] = []
    for completion, gold in zip(completions, answer):
        gold = str(gold).strip().upper() if gold is not None else ""
        if len(gold) != 1 or gold not in LETTERS:
            out.append(None)
            continue
        out.append(1.0 if choice_letter(completion) == gold else 0.0)
    return out
