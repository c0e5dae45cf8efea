"""The offline algorithms (mle, iq, dpo, qadapter) through the one training loop: their data
files and errors, a round's trajectories, pairs kept whole, runs, resume."""

import copy
import json
import random

import pytest
import torch

import reval.train as train_mod
from reval import offline
from reval.buffer import collate
from reval.config import TrainConfig
from reval.data import Demonstration, PreferencePair, load_demonstrations, load_preferences
from reval.model import PROMPT_TEMPLATE, format_prompt


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _demos(path, n=8):
    return _jsonl(path, [{"prompt": f"{i}*3", "response": f"{i} * 3 = {3 * i}"} for i in range(n)])


def _pairs(path, n=8):
    return _jsonl(path, [{"prompt": f"{i}+2", "chosen": f"{i + 2}", "rejected": f"{i + 3} or so"} for i in range(n)])


# -- data files ------------------------------------------------------------------------------

@pytest.mark.parametrize("row, what", [
    ({"prompt": "1+1"}, "line 2: missing field 'response'"),
    ({"prompt": "1+1", "response": 2}, "line 2: field 'response' must be a non-empty string, got"),
    ({"prompt": "  ", "response": "2"}, "line 2: field 'prompt' must be a non-empty string"),
    ({"prompt": "1+1", "response": ""}, "line 2: field 'response' must be a non-empty string"),
])
def test_bad_demonstration_rows_name_the_file_line_and_the_fix(tmp_path, row, what):
    path = _jsonl(tmp_path / "demos.jsonl", [{"prompt": "2+2", "response": "4"}, row])
    with pytest.raises(ValueError) as e:
        load_demonstrations(path)
    msg = str(e.value)
    assert "demos.jsonl" in msg and what in msg
    assert "--task.question-field" in msg and "--task.answer-field" in msg  # how to fix it


@pytest.mark.parametrize("row, what", [
    ({"prompt": "1+1", "chosen": "2"}, "line 2: missing field 'rejected'"),
    ({"prompt": "1+1", "chosen": ["2"], "rejected": "3"}, "line 2: field 'chosen' must be a non-empty string"),
    ({"prompt": "1+1", "chosen": "2", "rejected": " "}, "line 2: field 'rejected' must be a non-empty string"),
    ({"prompt": "1+1", "chosen": "2", "rejected": "2"}, "line 2: fields 'chosen' and 'rejected' are the same"),
])
def test_bad_preference_rows_name_the_file_line_and_the_fix(tmp_path, row, what):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "2+2", "chosen": "4", "rejected": "5"}, row])
    with pytest.raises(ValueError) as e:
        load_preferences(path)
    msg = str(e.value)
    assert "pairs.jsonl" in msg and what in msg and "--task.question-field" in msg


def test_renamed_fields_and_skip_bad_rows(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}, {"q": "c"}, "{not json", {"q": "e", "a": "f"}])
    with pytest.raises(ValueError, match=r"line 2: .*\(and 1 more bad rows\)"):
        load_demonstrations(path, prompt_field="q", response_field="a")
    with pytest.warns(UserWarning, match="skipped 2 bad rows"):
        got = load_demonstrations(path, prompt_field="q", response_field="a", skip_bad_rows=True)
    assert got == [Demonstration("a", "b"), Demonstration("e", "f")]
    pairs = _jsonl(tmp_path / "p.jsonl", [{"x": "p", "chosen": "a", "rejected": "a"}, {"x": "p", "chosen": "a",
                                                                                       "rejected": "b"}])
    with pytest.warns(UserWarning, match="skipped 1 bad rows"):
        assert load_preferences(pairs, prompt_field="x", skip_bad_rows=True) == [PreferencePair("p", "a", "b")]
    with pytest.raises(ValueError, match="no usable rows"):
        load_preferences(_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}]),
                         skip_bad_rows=True)


# -- a round's trajectories ------------------------------------------------------------------

def test_to_experiences_layout(tiny):
    _, tok = tiny
    eos = tok.eos_token_id
    examples = [PreferencePair("1+2", "3", "4"), Demonstration("5*5", "25")]
    exps = offline.to_experiences(examples, tok, template=PROMPT_TEMPLATE, chat=False, eos_id=eos, version=3,
                                  round=1, first_group_id=10, first_uid=100)
    assert len(exps) == 3
    chosen, rejected, demo = exps
    # the prompt exactly as a rollout prompt (format_prompt, no special tokens)
    want = tuple(tok(format_prompt(tok, "1+2", PROMPT_TEMPLATE, False), add_special_tokens=False)["input_ids"])
    assert chosen.prompt_ids == rejected.prompt_ids == want
    assert tok.decode(list(chosen.prompt_ids)) == "Q: 1+2\nA: "
    # every answer ends with EOS
    assert chosen.response_ids == tuple(tok("3", add_special_tokens=False)["input_ids"]) + (eos,)
    assert rejected.response_ids[-1] == demo.response_ids[-1] == eos
    assert (chosen.reward, rejected.reward, demo.reward) == (1.0, 0.0, 1.0)
    # an answer that already ends with the EOS text gets no second one (as TRL)
    [again] = offline.to_experiences([Demonstration("5*5", "25" + tok.eos_token)], tok, template=PROMPT_TEMPLATE,
                                     chat=False, eos_id=eos, version=0, round=0, first_group_id=0, first_uid=0)
    assert again.response_ids == demo.response_ids
    assert chosen.group_id == rejected.group_id == 10 and demo.group_id == 11
    assert [e.uid for e in exps] == [100, 101, 102]
    assert all(e.version == 3 and e.round == 1 and not e.truncated for e in exps)
    # the embedded task: a fresh flawed worked solution per problem
    from reval.tasks import TASKS

    task = TASKS["mul"]
    problem = task.split("train", 1, seed=0)[0]
    [e] = offline.to_experiences([problem], tok, template=PROMPT_TEMPLATE, chat=False, eos_id=eos, version=0,
                                 round=0, first_group_id=0, first_uid=0, task=task, rng=random.Random(0))
    assert tok.decode(list(e.response_ids[:-1])) == task.warmstart_solution(problem, random.Random(0))


def test_collate_keeps_each_pair_adjacent_and_in_order(tiny):
    _, tok = tiny
    pairs = [PreferencePair("x", "a1", "b1"), PreferencePair("y", "a2", "b2"), PreferencePair("x", "a3", "b3")]
    exps = offline.to_experiences(pairs, tok, template=PROMPT_TEMPLATE, chat=False, eos_id=tok.eos_token_id,
                                  version=0, round=0, first_group_id=0, first_uid=0)
    batch = collate(exps, tok.pad_token_id)
    texts = [tok.decode(r[m.bool()].tolist(), skip_special_tokens=True)
             for r, m in zip(batch.response_ids, batch.response_mask)]
    assert texts == ["a1", "b1", "a3", "b3", "a2", "b2"]  # the two "x" pairs share the prompt, each whole
    assert batch.reward.tolist() == [1.0, 0.0] * 3
    assert batch.prompt_index.tolist() == [0, 0, 0, 0, 1, 1]
    uids = batch.uid.tolist()  # each chosen row directly followed by its own rejected one
    assert [uids[i + 1] - uids[i] for i in (0, 2, 4)] == [1, 1, 1]


# -- pairs whole under micro-batching ---------------------------------------------------------

def test_an_odd_micro_batch_size_keeps_pairs_whole(tiny):
    from reval.distributed import LogProbModule
    from reval.reference import Reference

    model, tok = tiny
    ref = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the policy, so pairing matters
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = [PreferencePair(f"{i}+1", f"{i + 1}", f"wrong {i}" * (1 + i % 3)) for i in range(5)]
    exps = offline.to_experiences(pairs, tok, template=PROMPT_TEMPLATE, chat=False, eos_id=tok.eos_token_id,
                                  version=0, round=0, first_group_id=0, first_uid=0)
    batch = collate(exps, tok.pad_token_id)
    policy = LogProbModule(model)
    reference = Reference(model, ref)
    results = {}
    for micro in (10, 3, 1):  # 3 and 1 round down to whole pairs (2 rows)
        cfg = TrainConfig(algo="dpo")
        cfg.loss.beta = 1.0
        cfg.optim.micro_batch_size = micro
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay as they are
        results[micro] = train_mod.update(policy, reference, opt, batch, cfg)
    for micro in (3, 1):
        assert results[micro]["loss/total"] == pytest.approx(results[10]["loss/total"], rel=1e-5)
        assert results[micro]["loss/grad_norm"] == pytest.approx(results[10]["loss/grad_norm"], rel=1e-4)
    assert results[10]["loss/total"] != pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-3)


# -- runs --------------------------------------------------------------------------------------

def _cfg(tiny_dir, tmp_path, algo, data=None, name="run", **overrides):
    cfg = TrainConfig(algo=algo, rounds=2, out=tmp_path / name, progress=False, checkpoint_every=0,
                      report_to="none")
    cfg.model.path = str(tiny_dir)
    cfg.task.data = str(data) if data else None
    cfg.rollout.prompts_per_round, cfg.task.num_test, cfg.eval.samples = 4, 8, 0
    cfg.optim.micro_batch_size = 4
    for k, v in overrides.items():  # "rounds" or "section__field"
        section, _, field = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, field, v)
    return cfg


def _metrics(cfg):
    return [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo, kind, overrides, keys", [
    ("mle", "demos", {}, {"loss/nll"}),
    ("iq", "demos", {"loss__iq_lambda": 0.5}, {"loss/nll", "loss/td", "q/reward_mean", "q/v_mean"}),
    ("dpo", "pairs", {}, {"loss/dpo", "rewards/accuracy"}),
    ("dpo", "pairs", {"model__lora_rank": 4}, {"loss/dpo"}),
    ("qadapter", "pairs", {"model__qadapter_hidden": 8}, {"loss/preference", "loss/chi2"}),
])
def test_offline_algorithms_run_through_the_loop(tiny_dir, tmp_path, algo, kind, overrides, keys):
    data = (_demos if kind == "demos" else _pairs)(tmp_path / f"{kind}.jsonl")
    cfg = _cfg(tiny_dir, tmp_path, algo, data, **overrides)
    result = train_mod.train(cfg)
    assert result["round"] == 2 and result["updates"] == 2 and result["samples"] == 8
    rows = _metrics(cfg)
    assert [r["round"] for r in rows] == [1, 2]  # no eval set with own data and no task.eval_data
    for r in rows:
        assert keys | {"loss/total", "loss/grad_norm", "data/response_len"} <= set(r)
        assert all(r[k] == r[k] for k in keys)  # not NaN
        assert r["perf/skipped"] == 0.0
    assert (cfg.out / "checkpoints").exists()


def test_iq_on_the_embedded_task_from_the_command_line(tiny_dir, tmp_path):
    from reval.cli import main

    out = tmp_path / "cli"
    main(["train", "--algo", "iq", "--task.name", "mul", "--rounds", "2", "--rollout.prompts-per-round", "4",
          "--task.num-test", "4", "--model.path", str(tiny_dir), "--no-progress", "--report-to", "none",
          "--out", str(out), "--eval.every", "0"])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval/accuracy" in rows[0] and rows[-1]["round"] == 2
    assert {"loss/nll", "loss/td"} <= set(rows[1]) and rows[1]["data/response_len"] > 20  # worked solutions


@pytest.mark.parametrize("algo", ["dpo", "qadapter"])
def test_preferences_without_data_are_a_clear_error(tiny_dir, tmp_path, algo):
    with pytest.raises(ValueError, match=f"--algo {algo} learns from preference pairs: pass --task.data"):
        train_mod.train(_cfg(tiny_dir, tmp_path, algo))


def test_a_resumed_offline_run_continues_as_if_uninterrupted(tiny_dir, tmp_path):
    data = _demos(tmp_path / "demos.jsonl", n=12)
    straight = _cfg(tiny_dir, tmp_path, "iq", data, name="straight")
    straight.rounds = 3
    train_mod.train(straight)
    cut = _cfg(tiny_dir, tmp_path, "iq", data, name="cut")
    train_mod.train(cut)  # checkpoint at round 2
    cut.rounds = 3
    result = train_mod.train(cut, resume=True)
    assert result["round"] == 3 and result["updates"] == 3
    a, b = _metrics(straight), _metrics(cut)
    assert [r["round"] for r in b] == [1, 2, 3]
    for key in ("loss/total", "loss/nll", "loss/td", "data/response_len"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5), key


def test_the_python_api_takes_records_and_refuses_question_answer_rows(tiny_dir, tmp_path):
    from reval.data import Problem

    demos = [Demonstration(f"{i}-1", f"{i - 1}") for i in range(4)]
    cfg = _cfg(tiny_dir, tmp_path, "mle", rounds=1)
    assert train_mod.train(cfg, problems=demos, eval_problems=[])["updates"] == 1
    rows = [Problem(f"{i}-1", f"{i - 1}") for i in range(4)]
    with pytest.raises(ValueError, match="--algo iq learns from demonstrations, got Problem"):
        train_mod.train(_cfg(tiny_dir, tmp_path, "iq", name="rows"), problems=rows, eval_problems=[])
    with pytest.raises(ValueError, match="--algo dpo learns from preferences, got Demonstration"):
        train_mod.train(_cfg(tiny_dir, tmp_path, "dpo", name="pairs"), problems=demos, eval_problems=[])


def test_revaltrainer_reads_pairs_and_demonstrations_for_the_offline_algorithms(tiny_dir, tmp_path):
    from reval import ReValConfig, ReValTrainer

    pairs = [{"prompt": f"{i}+1", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(4)]
    trainer = ReValTrainer(model=str(tiny_dir), train_dataset=pairs, args=ReValConfig(
        algo="dpo", output_dir=str(tmp_path / "dpo"), rounds=1, prompts_per_round=2, progress=False,
        report_to="none"))
    assert trainer.train_problems == [PreferencePair(**p) for p in pairs]
    assert trainer.train()["updates"] == 1
    demos = [{"prompt": f"{i}+1", "response": f"{i + 1}"} for i in range(4)]
    trainer = ReValTrainer(model=str(tiny_dir), train_dataset=demos, args=ReValConfig(
        algo="iq", output_dir=str(tmp_path / "iq"), rounds=1, prompts_per_round=2, progress=False,
        report_to="none"))
    assert trainer.train_problems[0] == Demonstration("0+1", "1")
    assert trainer.train()["updates"] == 1
