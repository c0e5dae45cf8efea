"""Rewards: plain callables with TRL's signature, and the reward variants of ReVal.

A reward function is `f(completions: list[str], **dataset_columns) -> list[float | None]`,
the same contract as TRL's `GRPOTrainer(reward_funcs=...)`, so functions can be shared.
None means "cannot score this one": the answer is skipped, not counted as wrong.

`REWARDS` names the built-in ones (`resolve_rewards` looks names up); `score` combines
several with weights and a time limit; `time_limit` is the nestable, signal-based limit
that `score` and the math rewards use.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from reval.tasks.arithmetic import verify
from reval.tasks.choice import multiple_choice_reward
from reval.tasks.math import boxed_format_reward, math_verify_reward

RewardFn = Callable[..., list]

REWARD_VARIANTS = ("binary", "group_mean", "plus_minus_one")


def correctness_reward(completions: list[str], answer: list[str], **_) -> list[float | None]:
    """1.0 when the extracted final answer equals the reference answer, else 0.0."""
    return [1.0 if verify(c, a) else 0.0 for c, a in zip(completions, answer)]


REWARDS: dict[str, RewardFn] = {
    "arithmetic": correctness_reward,  # the embedded addition task (exact answer)
    "math_verify": math_verify_reward,  # math data: boxed answer vs reference, via math-verify
    "boxed_format": boxed_format_reward,  # shaping: 1 when the answer is boxed at all
    "multiple_choice": multiple_choice_reward,  # "choice" data: the answer letter vs the reference
}


def resolve_rewards(names: Sequence[str | RewardFn]) -> list[RewardFn]:
    """The reward functions in `names`, in order: callables as they are, keys of `REWARDS`,
    or a user's function as "package.module:function" or "path/to/file.py:function".

    Raises ValueError on an unknown name or a function that cannot be loaded, and
    ImportError when a function's optional dependency is missing (its `prepare()` imports
    it now, not inside a timed `score`).
    """
    fns = []
    for name in names:
        if callable(name):
            fns.append(name)
        elif name in REWARDS:
            fns.append(REWARDS[name])
        elif isinstance(name, str) and ":" in name:
            fns.append(load_reward(name))
        else:
            raise ValueError(f"unknown reward function {name!r}; known: {', '.join(sorted(REWARDS))}, or "
                             "your own as module:function or path/to/file.py:function")
    for fn in fns:
        prepare = getattr(fn, "prepare", None)
        if callable(prepare):
            prepare()
    return fns


def load_reward(ref: str) -> RewardFn:
    """A user's reward function from "package.module:function" or "path/to/file.py:function".
    Importing it runs that module's code: name only code you trust."""
    import importlib
    import importlib.util
    from pathlib import Path

    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise ValueError(f"reward {ref!r}: write module:function or path/to/file.py:function")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ValueError(f"reward {ref!r}: no file {path}")
            spec = importlib.util.spec_from_file_location(f"reval_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except ImportError as e:
        raise ValueError(f"reward {ref!r}: cannot import {where} ({e})") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed while loading
        raise ValueError(f"reward {ref!r}: importing {where} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(f"reward {ref!r}: {where} has no function {attr!r} "
                         f"(it has: {', '.join(public) or 'none'})")
    return fn


def reward_name(fn: RewardFn | str) -> str:
    """How a reward function is named in configs, metrics and messages."""
    if isinstance(fn, str):
        return fn
    for name, known in REWARDS.items():
        if known is fn:
            return name
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


# ---------------------------------------------------------------------------------------
# time_limit: SIGALRM + ITIMER_REAL, nestable

_REFIRE_S = 0.01  # after the deadline, interrupt again this often until the block exits
_SLACK_S = 1e-3  # clock slack when deciding whether a SIGALRM is due


class TimeLimitExceeded(TimeoutError):
    """Raised in a `time_limit` block; `.limit` is the `TimeLimit` that raised it."""

    def __init__(self, limit: TimeLimit):
        super().__init__(f"time limit of {limit.seconds:g}s exceeded")
        self.limit = limit


def signals_usable() -> bool:
    """True where `time_limit` works: a POSIX system (setitimer), on the main thread."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _run_pending_signal_handlers() -> None:
    """Does nothing; calling a Python function lets CPython run pending signal handlers."""


class TimeLimit:
    """The context manager `time_limit` returns; see there.

    After the block, `expired` tells whether this limit's own deadline was reached while
    the block ran (even if the block caught the TimeoutError and carried on).
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.expired = False
        self._installed = False
        self._done = False

    @property
    def active(self) -> bool:
        """Whether a timer is armed for this block (False off the main thread, or for None)."""
        return self._installed and not self._done

    def __enter__(self) -> TimeLimit:
        if self._installed:
            raise RuntimeError("a TimeLimit can be entered only once; make a new one")
        if self.seconds is None or not signals_usable():
            return self
        try:
            self._arm()
        except BaseException:  # an alarm (ours or an outer one) fired while arming
            self._disarm()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        if self._installed and not self._done:
            self._disarm()
        return False

    def _arm(self) -> None:
        now = time.monotonic()  # read before getitimer: the outer deadline errs early
        outer_delay, outer_interval = signal.getitimer(signal.ITIMER_REAL)
        self._prev_handler = signal.getsignal(signal.SIGALRM)
        self._outer_deadline = now + outer_delay if outer_delay > 0 else None
        self._outer_interval = outer_interval
        self._deadline = now + max(float(self.seconds), 0.0)
        self._fire_at = min(self._deadline, self._outer_deadline or float("inf"))
        self._installed = True
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self._fire_at - time.monotonic(), 1e-6))

    def _on_alarm(self, signum, frame) -> None:
        if self._done:  # a stale signal that arrived as the block finished
            return
        now = time.monotonic()
        if now + _SLACK_S < self._fire_at:  # early or stray SIGALRM: wait for the rest
            signal.setitimer(signal.ITIMER_REAL, self._fire_at - now)
            return
        if now + _SLACK_S >= self._deadline:
            self.expired = True
        # (else the outer deadline came first: interrupt this block; on exit, the outer fires)
        # Code that catches Exception (sympy, math-verify) may swallow the error: fire again.
        signal.setitimer(signal.ITIMER_REAL, _REFIRE_S)
        raise TimeLimitExceeded(self)

    def _disarm(self) -> None:
        self._done = True  # from here on our handler ignores late signals
        signal.setitimer(signal.ITIMER_REAL, 0)
        _run_pending_signal_handlers()  # a signal already delivered runs (and is ignored) now
        prev = self._prev_handler
        signal.signal(signal.SIGALRM, prev if prev is not None else signal.SIG_DFL)
        if self._outer_deadline is None:
            return
        remaining = self._outer_deadline - time.monotonic()
        if remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, remaining, self._outer_interval)
        elif callable(prev):  # the outer deadline passed inside this block: fire it now
            if self._outer_interval > 0:
                signal.setitimer(signal.ITIMER_REAL, self._outer_interval, self._outer_interval)
            prev(signal.SIGALRM, sys._getframe())
        else:  # SIG_DFL / SIG_IGN: let the kernel deliver it, as the outer timer would have
            signal.setitimer(signal.ITIMER_REAL, 1e-6, self._outer_interval)


def time_limit(seconds: float | None) -> TimeLimit:
    """Context manager: raise `TimeoutError` (a `TimeLimitExceeded`) in the block after `seconds`.

    Works on the main thread of a POSIX system, with `signal.setitimer(ITIMER_REAL)` and a
    SIGALRM handler, so it interrupts pure-Python work (sympy, a loop) and leaks nothing;
    C code that never returns to the interpreter cannot be interrupted. Off the main
    thread, where signals cannot be used, and with `seconds` None, it does nothing.

    Nestable: on entry it reads the pending outer timer (`signal.getitimer`; another
    `time_limit`, or any SIGALRM timer such as `signal.alarm`) and arms the earlier of the
    two deadlines; on exit it restores the outer handler and re-arms the outer timer with
    what is left of it. If the outer deadline passed inside the block, the block gets a
    TimeoutError and the outer handler then runs at once, so the outer block gets its
    TimeoutError too. Code inside must not arm SIGALRM timers of its own without restoring
    them (math-verify's built-in timeouts cancel the outer timer: turn them off).

    Once the deadline has passed the error is raised again every 10 ms until the block
    exits, so code that catches `Exception` and carries on (sympy, math-verify do) is
    still stopped; `limit.expired` says afterwards whether this limit's deadline was hit::

        with time_limit(5) as limit:
            ...
        if limit.expired: ...
    """
    return TimeLimit(seconds)


# ---------------------------------------------------------------------------------------
# score


def score(reward_fns: Sequence[RewardFn], completions: list[str], columns: dict[str, list],
          weights: Sequence[float] | None = None, timeout: float | None = None,
          errors: dict[str, str] | None = None) -> tuple[list[float | None], int]:
    """Weighted sum of several reward functions; returns `(rewards, num_failures)`.

    A function that raises, runs past `timeout` seconds on an answer, returns the wrong
    number of values or a non-number marks the affected answers None (skipped) and counts a
    failure, instead of crashing or stalling the run.

    `timeout` is per answer, but each function is first called once on all the answers
    under `timeout` (one call, as TRL makes it: cheap rewards stay one call, batched ones
    keep their batch). Only if that call runs past it is the function called again on each
    answer alone, each under `timeout`, so a slow answer loses only itself and every answer
    that finishes keeps its reward. The retry costs up to `timeout` more than the answers
    themselves take; after `TIMEOUTS_IN_A_ROW` (8) answers in a row time out, the rest are
    given None untried, so a function that hangs on every answer costs `timeout` x 9. On
    the main thread (POSIX) each call runs under `time_limit(timeout)`, which interrupts it;
    elsewhere it runs in a daemon thread that is abandoned on timeout (Python cannot kill a
    thread, so a function that can hang for ever keeps running there: it should enforce its
    own limit too).

    `errors`, if given, receives for each function that failed the first failure, by name
    (`reward_name`): the exception, the timeout, or the value it returned.
    """
    weights = list(weights) if weights is not None else [1.0] * len(reward_fns)
    total: list[float | None] = [0.0] * len(completions)
    failures = 0
    for fn, w in zip(reward_fns, weights):
        error = None
        try:
            values = _checked_call(fn, completions, columns, timeout)
        except _TimedOut as e:  # some answer is slow: score each alone so the others are kept
            error = str(e)
            values = _one_by_one(fn, completions, columns, timeout) if len(completions) > 1 \
                else [None] * len(completions)
        except TimeLimitExceeded as e:
            if e.limit.active:  # a time_limit around score() ran out: not this function's fault
                raise
            values, error = [None] * len(completions), f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - user code; a failure must not kill the run
            values, error = [None] * len(completions), f"{type(e).__name__}: {e}"
        name = reward_name(fn) if errors is not None else None
        for i, v in enumerate(values):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN
            if not ok and name is not None and name not in errors:
                errors[name] = error or (
                    "returned None for an answer (cannot score it: skipped)" if v is None
                    else f"returned {v!r} for an answer (a number or None expected)")
            if not ok:
                failures += v is not None or total[i] is not None
                total[i] = None
            elif total[i] is not None:
                total[i] += w * float(v)
    return total, failures


class _TimedOut(TimeoutError):
    """A reward function ran past `score`'s own limit (not an outer one, not its own error)."""


def _checked_call(fn: RewardFn, completions: list[str], columns: dict, timeout: float | None) -> list:
    values = _call(fn, completions, columns, timeout)
    if len(values) != len(completions):
        raise ValueError(f"returned {len(values)} rewards for {len(completions)} completions")
    return values


def _one_by_one(fn: RewardFn, completions: list[str], columns: dict, timeout: float | None) -> list:
    """`fn` on each answer alone (its row of every column), each under `timeout`; None where it
    fails. After `TIMEOUTS_IN_A_ROW` answers in a row time out, the function is taken to hang
    on everything and the remaining answers get None without being tried."""
    values: list = []
    late = 0  # consecutive timeouts
    for i, completion in enumerate(completions):
        if late >= TIMEOUTS_IN_A_ROW:
            return values + [None] * (len(completions) - i)
        try:
            row = {k: v[i:i + 1] for k, v in columns.items()}
            values.append(_checked_call(fn, [completion], row, timeout)[0])
            late = 0
        except TimeLimitExceeded as e:
            if e.limit.active:
                raise
            values.append(None)
        except _TimedOut:
            values.append(None)
            late += 1
        except Exception:  # noqa: BLE001 - user code, as in score()
            values.append(None)
            late = 0
    return values


TIMEOUTS_IN_A_ROW = 8  # bounds a round to timeout x 9 when a reward function hangs on every answer


def _call(fn: RewardFn, completions: list[str], columns: dict, timeout: float | None) -> list:
    if timeout is None:
        return list(fn(completions, **columns))
    late = _TimedOut(f"reward function {getattr(fn, '__name__', fn)!r} took over {timeout}s")
    if signals_usable():
        limit = time_limit(timeout)
        try:
            with limit:
                values = list(fn(completions, **columns))
        except TimeLimitExceeded as e:
            if e.limit is limit and limit.expired:
                raise late from None
            raise
        if limit.expired:  # it caught the TimeoutError and returned late: do not trust it
            raise late
        return values
    result: dict = {}

    def target():
        try:
            result["value"] = list(fn(completions, **columns))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise late
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
