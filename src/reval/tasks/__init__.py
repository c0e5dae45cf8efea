"""Tasks: where prompts, reference answers and verifiers come from (stage 1 of the pipeline).

Two embedded tasks ship with their own warm-start models, each built by `reval pretrain`:

- `add` (`reval.tasks.arithmetic`): addition with one systematic habit to fix (dropped
  carries). RL fixes it in a couple of rounds: the quick demo and the learning test.
- `mul` (`reval.tasks.multiply`): 2-digit multiplication with partial products, two kinds
  of mistakes at many different rates; RL improves it gradually. The benchmark's task.

User data (JSONL, Parquet, ...) goes through `reval.data` instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from reval.tasks import arithmetic, multiply
from reval.tasks.arithmetic import Problem


@dataclass(frozen=True)
class EmbeddedTask:
    split: Callable[..., list[Problem]]  # split(name, n, seed=..., digits=...) -> problems
    warmstart_solution: Callable[[Problem, random.Random], str]  # the warm start's flawed worked answer
    max_new_tokens: int  # answer budget: the longest correct answer plus slack
    asset: str  # directory of the shipped warm start under reval/assets


def _add_split(name: str, n: int, seed: int = 0, digits: int = 3) -> list[Problem]:
    return arithmetic.split(name, n, digits, seed=seed)


def _mul_split(name: str, n: int, seed: int = 0, digits: int = 3) -> list[Problem]:
    return multiply.split(name, n, seed=seed)  # always 2 x 2 digits


TASKS: dict[str, EmbeddedTask] = {
    "add": EmbeddedTask(split=_add_split, max_new_tokens=48, asset="warmstart",
                        warmstart_solution=lambda p, rng: arithmetic.solution(p.a, p.b, rng, arithmetic.DROP_CARRY)),
    "mul": EmbeddedTask(split=_mul_split, max_new_tokens=112, asset="warmstart-mul",
                        warmstart_solution=lambda p, rng: multiply.solution(p.a, p.b, rng)),
}


def warmstart_path(task: str) -> Path:
    """The shipped warm-start model of an embedded task (built by `reval pretrain --task`)."""
    return Path(str(resources.files("reval") / "assets" / TASKS[task].asset))
