"""Issue 25, a newcomer's first hour: resuming from a named checkpoint as in TRL, config keys
spelt the way the other entry points accept them, and errors that speak the API in use."""

import dataclasses
import json

import pytest

from reval import ReValConfig, ReValTrainer
from reval.config import TrainConfig
from reval.tasks import TASKS
from reval.trainer import config_key

SMALL = dict(prompts_per_round=4, num_generations=4, capacity=32, micro_batch_size=8, progress=False,
             report_to="none")


def _rows(n=32):
    return [{"question": p.question, "answer": p.answer} for p in TASKS["add"].split("train", n, seed=0)]


def _metric_rounds(run):
    return [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# -- resume_from_checkpoint: True = the newest, a path = that one ---------------------------------

def test_resume_from_a_named_checkpoint_continues_from_that_round(tmp_path, capsys):
    calls = []

    def reward(completions, answer, **_):  # called once per round: counts the rounds actually run
        calls.append(len(completions))
        return [1.0 if f"{{{a}}}" in c else 0.0 for c, a in zip(completions, answer)]

    run = tmp_path / "run"
    args = dict(output_dir=run, checkpoint_every=1, keep_checkpoints=3, **SMALL)
    ReValTrainer(reward_funcs=[reward], train_dataset=_rows(), args=ReValConfig(rounds=3, **args)).train()
    first = run / "checkpoints" / "round-000001"
    state = json.loads((first / "state.json").read_text())
    calls.clear()
    capsys.readouterr()
    result = ReValTrainer(reward_funcs=[reward], train_dataset=_rows(),
                         args=ReValConfig(rounds=4, **args)).train(resume_from_checkpoint=str(first))
    assert len(calls) == 3  # rounds 2, 3 and 4: from round 1, not from the newest (round 3)
    assert result["round"] == 4 and result["samples"] == state["counters"]["samples"] + 3 * 16
    assert _metric_rounds(run) == [1, 2, 3, 4]  # rows after round 1 dropped, then written once each
    err = capsys.readouterr().err
    assert "set round-000002 aside as superseded-round-000002" in err and "round-000003" in err
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["round-000002", "round-000003", "round-000004",
                     "superseded-round-000002", "superseded-round-000003"]
    # True still means the newest: round 4, so a longer run only runs round 5
    calls.clear()
    ReValTrainer(reward_funcs=[reward], train_dataset=_rows(),
                 args=ReValConfig(rounds=5, **args)).train(resume_from_checkpoint=True)
    assert len(calls) == 1 and _metric_rounds(run) == [1, 2, 3, 4, 5]


def test_resume_from_a_checkpoint_that_is_not_this_runs_is_refused(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    for out in (run, other):
        ReValTrainer(train_dataset=_rows(), reward_funcs=["arithmetic"],
                     args=ReValConfig(output_dir=out, rounds=2, checkpoint_every=1, **SMALL)).train()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())

    def resume(path):
        trainer = ReValTrainer(train_dataset=_rows(), reward_funcs=["arithmetic"],
                               args=ReValConfig(output_dir=run, rounds=3, checkpoint_every=1, **SMALL))
        return trainer.train(resume_from_checkpoint=path)

    foreign = other / "checkpoints" / "round-000002"
    with pytest.raises(ValueError, match=f"{foreign}.* is not a checkpoint of the run in {run}"):
        resume(foreign)
    with pytest.raises(ValueError, match="round-000009.* is not a checkpoint of the run"):
        resume(run / "checkpoints" / "round-000009")
    named = run / "checkpoints" / "round-000001"
    (named / "state.safetensors").write_bytes(b"damaged")
    with pytest.raises(ValueError, match=f"cannot resume from {named}: .*state.safetensors"):
        resume(named)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing renamed or removed


# -- config keys: dotted in files, underscored in ReValConfig, close matches when unknown -------

def test_config_files_take_dotted_keys_mixed_with_sections(tmp_path, monkeypatch):
    import reval.train
    from reval.cli import main

    cfg = TrainConfig.from_dict({"rollout.prompts_per_round": 4, "rollout": {"samples_per_prompt": 2},
                                 "loss.beta": 0.1, "rounds": 3})
    assert (cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.loss.beta, cfg.rounds) == \
        (4, 2, 0.1, 3)
    with pytest.raises(ValueError, match="loss.beta is given twice"):
        TrainConfig.from_dict({"loss.beta": 0.1, "loss": {"beta": 0.2}})
    seen = []
    monkeypatch.setattr(reval.train, "train", lambda cfg, resume=False: seen.append(cfg) or {})
    path = tmp_path / "cfg.yaml"
    path.write_text("rollout.prompts_per_round: 4\nrollout:\n  samples_per_prompt: 2\neval.every: 1\n")
    main(["train", "--config", str(path), "--out", str(tmp_path / "run")])
    assert (seen[0].rollout.prompts_per_round, seen[0].rollout.samples_per_prompt, seen[0].eval.every) == (4, 2, 1)


@pytest.mark.parametrize("given,suggested", [
    ({"loss.betta": 1}, "loss.beta"),
    ({"loss": {"betta": 1}}, "loss.beta"),
    ({"rollout": {"prompt_per_round": 4}}, "rollout.prompts_per_round"),
    ({"prompts_per_round": 4}, "rollout.prompts_per_round"),  # a section's field at the top level
    ({"rollout.prompts-per-round": 4}, "rollout.prompts_per_round"),  # the flag's spelling
])
def test_an_unknown_config_key_names_the_closest_dotted_keys(given, suggested):
    with pytest.raises(ValueError, match="unknown config key") as e:
        TrainConfig.from_dict(given)
    assert f"did you mean {suggested}" in str(e.value)


def test_an_unknown_key_in_a_section_lists_that_sections_fields():
    with pytest.raises(ValueError, match="unknown config key") as e:
        TrainConfig.from_dict({"eval": {"evry": 1}})
    assert "eval.every" in str(e.value) and "eval.samples" in str(e.value)


def test_revalconfig_takes_underscored_section_names():
    args = ReValConfig(eval_every=1, rollout_prompts_per_round=4, model_path="some/dir", loss_beta=0.1)
    assert (args.eval.every, args.rollout.prompts_per_round, args.model.path, args.loss.beta) == \
        (1, 4, "some/dir", 0.1)
    cfg = TrainConfig()  # every section_field spelling maps to exactly one field
    for section in (f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))):
        for leaf in dataclasses.fields(getattr(cfg, section)):
            assert config_key(f"{section}_{leaf.name}") == f"{section}.{leaf.name}"
    with pytest.raises(ValueError, match="unknown setting 'eval_evry'.*did you mean eval_every"):
        ReValConfig(eval_evry=1)
    with pytest.raises(ValueError, match="unknown setting 'loss.betta'.*did you mean loss.beta"):
        ReValConfig(**{"loss.betta": 1})


# -- a run directory that already holds a run: said in the API's own terms -----------------------

def test_an_occupied_output_dir_is_explained_in_python_terms(tmp_path):
    run = tmp_path / "run"
    ReValTrainer(train_dataset=_rows(), reward_funcs=["arithmetic"],
                 args=ReValConfig(output_dir=run, rounds=1, **SMALL)).train()
    with pytest.raises(ValueError, match="already holds a run") as e:
        ReValTrainer(train_dataset=_rows(), reward_funcs=["arithmetic"],
                     args=ReValConfig(output_dir=run, rounds=1, **SMALL)).train()
    message = str(e.value)
    assert "resume_from_checkpoint=True" in message and "ReValConfig(output_dir=" in message
    assert "--resume" not in message and "--out" not in message


def test_a_fresh_start_in_an_occupied_output_dir_leaves_its_start_model_alone(tmp_path):
    """A model object is saved to <output_dir>/start-model, which a resume of the run loads:
    a refused fresh start must not have overwritten it with another model first."""
    from reval.model import default_model_path, load_model

    run = tmp_path / "run"
    model, tokenizer = load_model(default_model_path("add"))
    ReValTrainer(model=model, processing_class=tokenizer, train_dataset=_rows(), reward_funcs=["arithmetic"],
                 args=ReValConfig(output_dir=run, rounds=1, **SMALL)).train()
    start = run / "start-model" / "model.safetensors"
    before = start.read_bytes()
    other, _ = load_model(default_model_path("mul"))
    with pytest.raises(ValueError, match="already holds a run"):
        ReValTrainer(model=other, processing_class=tokenizer, train_dataset=_rows(), reward_funcs=["arithmetic"],
                     args=ReValConfig(output_dir=run, rounds=1, **SMALL)).train()
    assert start.read_bytes() == before
