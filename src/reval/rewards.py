"""Rewards: plain callables with TRL's signature, and the reward variants of ReVal.

A reward function is `f(completions: list[str], **dataset_columns) -> list[float | None]`,
the same contract as TRL's `GRPOTrainer(reward_funcs=...)`, so functions can be shared.
None means "cannot score this one": the answer is skipped, not counted as wrong.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from reval.tasks.arithmetic import verify

RewardFn = Callable[..., list]

REWARD_VARIANTS = ("binary", "group_mean", "plus_minus_one")


def correctness_reward(completions: list[str], answer: list[str], **_) -> list[float | None]:
    """1.0 when the extracted final answer equals the reference answer, else 0.0."""
    return [1.0 if verify(c, a) else 0.0 for c, a in zip(completions, answer)]


def score(reward_fns: Sequence[RewardFn], completions: list[str], columns: dict[str, list],
          weights: Sequence[float] | None = None,
          timeout: float | None = None) -> tuple[list[float | None], int]:
    """Weighted sum of several reward functions; returns `(rewards, num_failures)`.

    A function that raises, hangs past `timeout` seconds, returns the wrong number of
    values or a non-number marks the affected answers None (skipped) and counts a
    failure, instead of crashing or stalling the run. A timed-out call keeps running in
    its (daemon) thread: Python cannot kill a thread, so a reward function that can hang
    for ever should enforce its own limit too.
    """
    weights = list(weights) if weights is not None else [1.0] * len(reward_fns)
    total: list[float | None] = [0.0] * len(completions)
    failures = 0
    for fn, w in zip(reward_fns, weights):
        try:
            values = list(_call(fn, completions, columns, timeout))
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} rewards for {len(completions)} completions")
        except Exception:  # noqa: BLE001 - user code; a failure must not kill the run
            values = [None] * len(completions)
        for i, v in enumerate(values):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN
            if not ok:
                failures += v is not None or total[i] is not None
                total[i] = None
            elif total[i] is not None:
                total[i] += w * float(v)
    return total, failures


def _call(fn: RewardFn, completions: list[str], columns: dict, timeout: float | None):
    if timeout is None:
        return fn(completions, **columns)
    result: dict = {}

    def target():
        try:
            result["value"] = fn(completions, **columns)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"reward function {getattr(fn, '__name__', fn)!r} took over {timeout}s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def shape_reward(reward, group_mean, variant: str):
    """The reward ReVal / TBRM regress on (method.md section 4); works on floats or tensors.

    - binary: r as given (0 / 1).
    - group_mean: r - mean of its group's rewards (the paper's best variant).
    - plus_minus_one: 2r - 1, so a wrong answer gets -1.
    """
    if variant == "binary":
        return reward
    if variant == "group_mean":
        return reward - group_mean
    if variant == "plus_minus_one":
        return 2 * reward - 1
    raise ValueError(f"unknown reward variant {variant!r}; choose one of {REWARD_VARIANTS}")
