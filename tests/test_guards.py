"""Guards of issue 15: values and data that used to pass and broke the run later, or silently."""

import copy
import dataclasses
import json
import math
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import reval.rewards as rewards_mod
from reval.buffer import collate
from reval.config import TrainConfig
from reval.distributed import LogProbModule
from reval.reference import Reference
from reval.rewards import score, time_limit
from reval.rollout import Experience
from reval.train import update


# --- configuration ---------------------------------------------------------------------------

def _set(cfg, dotted, value):
    *path, last = dotted.split(".")
    obj = cfg
    for p in path:
        obj = getattr(obj, p)
    setattr(obj, last, value)


def _float_fields(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield prefix + f.name


FLOAT_FIELDS = list(_float_fields(TrainConfig()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_every_float_field_rejects_nan_and_inf(name, bad):
    cfg = TrainConfig()
    _set(cfg, name, bad)
    with pytest.raises(ValueError, match=rf"{name} = {bad!r} is invalid: must be finite"):
        cfg.validate()


def test_reward_weights_must_be_finite():
    cfg = TrainConfig()
    cfg.task.rewards, cfg.task.reward_weights = ("arithmetic",), (float("nan"),)
    with pytest.raises(ValueError, match=r"task\.reward_weights = \(nan,\) is invalid: must hold finite numbers"):
        cfg.validate()


def test_config_file_value_outside_a_fields_choices():
    with pytest.raises(ValueError, match=r"config key model\.dtype must be one of \('float32', 'bfloat16'\), "
                                         r"got 'float64'"):
        TrainConfig.from_dict({"model": {"dtype": "float64"}})


@pytest.mark.parametrize("args,message", [
    (["--seed", str(10**23)], "seed = 100000000000000000000000 is invalid: must be in [0, 4294967295]"),
    (["--optim.lr", "inf", "--rollout.reward-timeout", "1e10"],
     "optim.lr = inf is invalid: must be finite and in (0, 1]"),
])
def test_cli_out_of_range_values_name_the_field(tmp_path, args, message):
    proc = subprocess.run([sys.executable, "-m", "reval.cli", "train", *args, "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything is written or loaded


# --- rewards: a slow answer loses only itself ------------------------------------------------

def _sleepy(calls):
    def reward(completions, answer, **_):
        calls.append(len(completions))
        for c in completions:
            if c.startswith("slow"):
                time.sleep(3)  # interrupted by the 0.5 s limit
        return [1.0 if c.endswith(a) else 0.0 for c, a in zip(completions, answer)]
    return reward


def test_slow_answers_do_not_erase_the_others():
    calls = []
    comps = [f"fast {i}" for i in range(8)] + [f"slow {i}" for i in range(7)]
    comps = comps[::2] + comps[1::2]  # interleaved
    answers = [c.split()[1] for c in comps]
    start = time.monotonic()
    # a limit well above a fast answer's time, so a stalled machine (CI) cannot time one out
    rewards, failures = score([_sleepy(calls)], comps, {"answer": answers}, timeout=0.5)
    elapsed = time.monotonic() - start
    assert rewards == [1.0 if c.startswith("fast") else None for c in comps]
    assert failures == 7
    assert calls == [15] + [1] * 15  # one call on all, then each answer alone
    assert elapsed < 0.5 * 9 + 1.5  # the whole call, then each slow answer, at 0.5 s each


def test_a_reward_that_hangs_on_every_answer_is_given_up_after_eight_in_a_row():
    calls = []
    comps = [f"slow {i}" for i in range(40)]
    start = time.monotonic()
    rewards, failures = score([_sleepy(calls)], comps, {"answer": [str(i) for i in range(40)]}, timeout=0.1)
    assert rewards == [None] * 40 and failures == 40
    assert calls == [40] + [1] * 8  # the whole call, then 8 single answers: not 40
    assert time.monotonic() - start < 0.1 * 9 + 1.5


def test_fast_rewards_stay_one_call():
    calls = []
    rewards, failures = score([_sleepy(calls)], ["fast 1", "fast 2"], {"answer": ["1", "3"]}, timeout=5)
    assert rewards == [1.0, 0.0] and failures == 0 and calls == [2]


def test_outer_limit_still_stops_score():
    """A time_limit around score() is not a slow answer: it propagates, it is not retried."""
    calls = []
    with pytest.raises(TimeoutError):
        with time_limit(0.3):
            score([_sleepy(calls)], ["slow 1", "slow 2"], {"answer": ["1", "2"]}, timeout=5)
    assert calls == [2]


def test_raising_reward_is_not_retried_per_answer():
    calls = []

    def boom(completions, **_):
        calls.append(len(completions))
        raise RuntimeError("down")

    assert score([boom], ["a", "b", "c"], {}, timeout=1) == ([None] * 3, 3) and calls == [3]


# --- rounds in which nothing could be scored --------------------------------------------------

def _tiny_cfg(tiny_dir, out, **kw):
    cfg = TrainConfig(rounds=6, out=out, progress=False, checkpoint_every=0, **kw)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 2, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test = 8, 8, 4
    cfg.eval.every = 0
    return cfg


def test_a_run_that_scores_nothing_stops_with_the_likely_causes(tiny_dir, tmp_path, monkeypatch):
    from reval.train import train

    def needs_a_column(completions, answer, solution, **_):  # the data has no "solution"
        return [1.0] * len(completions)

    monkeypatch.setitem(rewards_mod.REWARDS, "needs_solution", needs_a_column)
    cfg = _tiny_cfg(tiny_dir, tmp_path / "run")
    cfg.task.rewards = ("needs_solution",)
    cfg.rollout.max_unscored_rounds = 2
    with pytest.raises(ValueError, match=r"no answer could be scored in 2 rounds in a row \(rounds 1-2; round 2: "
                                         r"8 reward failures among 8 answers\).*needs_solution.*reward_timeout = 30s "
                                         r"is too short.*lacks a column.*answer, question"):
        train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "rollout/reward_failures" in r] == [1]  # stopped in round 2


# --- an optimizer step that writes non-finite weights is undone --------------------------------

def _experiences(tokenizer, rewards):
    """Answers "2i<eos>" to "Q: i+i=?", two per group."""
    out = []
    for i, r in enumerate(rewards):
        prompt = tuple(tokenizer(f"Q: {i}+{i}=?\nA: ", add_special_tokens=False)["input_ids"])
        resp = tuple(tokenizer(f"{2 * i}", add_special_tokens=False)["input_ids"]) + (tokenizer.eos_token_id,)
        out.append(Experience(prompt, resp, r, i // 2, 0.5, 0.5, 0, 0, False))
    return out


class PoisonedAdamW(torch.optim.AdamW):
    """AdamW whose steps numbered in `poison` leave an inf in the first weight."""

    def __init__(self, params, poison, **kw):
        super().__init__(params, **kw)
        self.poison, self.calls = poison, 0

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        self.calls += 1
        if self.calls in self.poison:
            self.param_groups[0]["params"][0].view(-1)[0] = math.inf


def _state(opt):
    return {i: {k: v.clone() for k, v in opt.state[p].items()}
            for i, p in enumerate(opt.param_groups[0]["params"]) if p in opt.state}


def test_step_that_writes_non_finite_weights_is_undone(tiny):
    model, tok = tiny
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # move the policy off the reference so the loss has a gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    batch = collate(_experiences(tok, [1.0, 0.0, 0.0, 1.0]), tok.pad_token_id)
    cfg = TrainConfig()
    opt = PoisonedAdamW(model.parameters(), poison={1, 3}, lr=1e-3)
    policy, reference = LogProbModule(model), Reference(model, ref)
    for step, skipped in ((1, 1.0), (2, 0.0), (3, 1.0), (4, 0.0)):
        before, state = [p.detach().clone() for p in model.parameters()], _state(opt)
        m = update(policy, reference, opt, batch, cfg)
        assert m["perf/skipped"] == skipped, f"step {step}"
        assert all(torch.isfinite(p).all() for p in model.parameters())
        if skipped:  # weights and optimizer state (moments, step count) exactly as before
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            after = _state(opt)
            assert after.keys() == state.keys()
            assert all(torch.equal(after[i][k], state[i][k]) for i in state for k in state[i])
        else:
            assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert int(next(iter(opt.state.values()))["step"]) == 2  # only the two good steps counted


def test_past_the_undo_limit_a_non_finite_step_stops_the_run(tiny, monkeypatch):
    """Big models keep no copy to undo a step with (3x the weights in host memory): stop instead."""
    import reval.loop.learner as learner_mod

    model, tok = tiny
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    batch = collate(_experiences(tok, [1.0, 0.0, 0.0, 1.0]), tok.pad_token_id)
    monkeypatch.setattr(learner_mod, "UNDO_MAX_PARAMS", 10)
    opt = PoisonedAdamW(model.parameters(), poison={1}, lr=1e-3)
    with pytest.raises(FloatingPointError, match="made the weights non-finite.*Resume from the last checkpoint"):
        update(LogProbModule(model), Reference(model, ref), opt, batch, TrainConfig())


# --- data at scale --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_large_data_length_check_memory_stays_flat(tiny_dir, tmp_path):
    """200k prompts: the context check's peak memory must not grow with the number of rows."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for i in range(200_000):
            fh.write(json.dumps({"question": f"{i % 997}+{i % 991}", "answer": str(i % 997 + i % 991)}) + "\n")
    script = textwrap.dedent(f"""
        import json
        from reval.data import load_problems
        from reval.model import load_model, prompts_too_long

        def peak_mb():  # VmHWM: the peak resident set size since the last reset
            status = open("/proc/self/status").read()
            return int(status.split("VmHWM:")[1].split()[0]) / 1024

        model, tok = load_model({str(tiny_dir)!r})
        questions = [p.question for p in load_problems({str(path)!r})]
        prompts_too_long(model, tok, questions[:5000], 48)  # warm up the tokenizer's buffers
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = peak_mb()
        too_long = prompts_too_long(model, tok, questions, 48)
        print(json.dumps({{"growth": peak_mb() - base, "too_long": len(too_long)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["too_long"] == 0
    assert out["growth"] < 60, out  # one batch of 4096 prompts; all 200k at once took 525 MB


def test_running_out_of_memory_names_the_batch_settings(tiny_dir, tmp_path, monkeypatch):
    """An allocator error (here simulated in the update) becomes a message naming what to lower."""
    import reval.loop.learner as learner_mod
    import reval.train as train_mod

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes")

    monkeypatch.setattr(learner_mod, "update", oom)
    cfg = TrainConfig(rounds=1, out=tmp_path / "run", progress=False)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.buffer.capacity = 4, 4, 32
    with pytest.raises(MemoryError, match=r"ran out of memory \(.*can't allocate memory.*optim.micro_batch_size = 64 "
                                          r".*prompts_per_round x samples_per_prompt = 16"):
        train_mod.train(cfg)
    monkeypatch.setattr(learner_mod, "update", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # other errors are not dressed up as memory
        train_mod.train(TrainConfig(**{**vars(cfg), "out": tmp_path / "run2"}))
