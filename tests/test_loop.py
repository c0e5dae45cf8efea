"""What the training loop feeds the loss: group statistics, truncation, replay choice."""

import pytest

import reval.loop.learner as learner_mod
import reval.train as train_mod
from reval.config import TrainConfig
from reval.rollout import Samples, to_experiences


def test_group_statistics_population_std_and_none_dropped():
    s = Samples(prompt_ids=[[1]] * 6, response_ids=[[2, 3]] * 6, truncated=[False] * 6)
    exps = to_experiences(s, [1.0, 0.0, None, 0.0, None, None], samples_per_prompt=3, version=4, round=2)
    assert len(exps) == 3  # answers whose reward is None are skipped
    first = [e for e in exps if e.group_id == 0]
    assert [e.reward for e in first] == [1.0, 0.0]
    assert first[0].group_mean == pytest.approx(0.5) and first[0].group_std == pytest.approx(0.5)  # ddof=0
    second = [e for e in exps if e.group_id == 1]
    # one scored answer: no group to compare with, the raw reward (mean 0, std 1; verl's convention)
    assert len(second) == 1 and (second[0].group_mean, second[0].group_std) == (0.0, 1.0)
    assert second[0].version == 4


def _spy_run(monkeypatch, tiny_dir, tmp_path, algo="reval", **overrides):
    """Run 3 tiny rounds, recording every batch the loop hands to `update`."""
    seen = []
    real_update = train_mod.update

    def spy(policy, ref, opt, batch, *args, **kwargs):
        seen.append(batch)
        return real_update(policy, ref, opt, batch, *args, **kwargs)

    monkeypatch.setattr(learner_mod, "update", spy)
    cfg = TrainConfig(algo=algo, rounds=3, out=tmp_path / "run", progress=False, checkpoint_every=0)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 2, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test = 24, 8, 4
    cfg.eval.samples = 0
    for k, v in overrides.items():
        section, name = k.split("__")
        setattr(getattr(cfg, section), name, v)
    return train_mod.train(cfg), seen


def test_replay_first_update_fresh_then_buffer(monkeypatch, tiny_dir, tmp_path):
    result, seen = _spy_run(monkeypatch, tiny_dir, tmp_path, buffer__updates_per_round=3)
    assert len(seen) == 9 and result["updates"] == 9
    for rnd in range(3):
        fresh, *replayed = seen[3 * rnd: 3 * rnd + 3]
        assert len(fresh) == 8 and set(fresh.version.tolist()) == {3 * rnd}  # this round's answers
        for b in replayed:  # uniform samples of B from the buffer (all rounds so far)
            assert len(b) == 8 and b.version.max().item() <= 3 * rnd
    # By round 3 the buffer holds 24 answers of rounds 0-2: replay draws older ones too.
    assert any(b.version.min().item() < 6 for b in seen[7:9])


def test_grpo_never_replays(monkeypatch, tiny_dir, tmp_path):
    _, seen = _spy_run(monkeypatch, tiny_dir, tmp_path, algo="grpo", buffer__updates_per_round=2)
    assert len(seen) == 6
    for rnd in range(3):  # both updates of a round see exactly the fresh batch
        a, b = seen[2 * rnd], seen[2 * rnd + 1]
        assert a is b and set(a.version.tolist()) == {2 * rnd}


def test_truncated_answers_reward_zero_or_dropped(monkeypatch, tiny_dir, tmp_path):
    _, seen = _spy_run(monkeypatch, tiny_dir, tmp_path / "a", rollout__max_new_tokens=2)
    assert seen and all(b.truncated.all() and (b.reward == 0).all() for b in seen)
    result, seen = _spy_run(monkeypatch, tiny_dir, tmp_path / "b", rollout__max_new_tokens=2,
                            loss__drop_truncated=True)
    assert seen == [] and result["updates"] == 0 and result["samples"] == 24


def test_problem_overrides_and_early_stop(monkeypatch, tiny_dir, tmp_path):
    """The one-prompt setting: one training problem, evaluated on itself, stopped by a callback."""
    from reval.model import format_prompt, load_tokenizer
    from reval.tasks.arithmetic import split

    only = split("test", 1, seed=0)[0]
    seen, evals = [], []
    real_update = train_mod.update
    monkeypatch.setattr(learner_mod, "update", lambda *a, **k: seen.append(a[3]) or real_update(*a, **k))
    cfg = TrainConfig(algo="reval", rounds=5, out=tmp_path / "one", progress=False, checkpoint_every=0)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 1, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size = 8, 4
    cfg.eval.every, cfg.eval.samples = 1, 2

    def stop(rec):
        evals.append(rec)
        return rec["round"] == 2

    result = train_mod.train(cfg, problems=[only], eval_problems=[only], should_stop=stop)
    assert result["round"] == 2 and [r["round"] for r in evals] == [1, 2]  # stopped after round 2
    assert "eval/mean@2" in evals[-1]
    tok = load_tokenizer(tiny_dir)
    prompt = tok(format_prompt(tok, only.question), add_special_tokens=False)["input_ids"]
    assert len(seen) == 4
    for batch in seen:  # every trajectory (fresh or replayed) answers the one problem
        for i in range(len(batch)):
            assert batch.prompt(i) == prompt
    assert (tmp_path / "one" / "checkpoints").exists()  # the early stop still checkpoints
