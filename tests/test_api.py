"""A TRL user's first five minutes: the Python trainer, their own rewards and data without
silent failures, and a command line that answers at once."""

import dataclasses
import json
import subprocess
import sys

import pytest

from reval import ReValConfig, ReValTrainer
from reval.config import TrainConfig
from reval.tasks import TASKS
from reval.trainer import config_key

CMD = [sys.executable, "-m", "reval.cli"]
SMALL = dict(rounds=2, prompts_per_round=4, num_generations=4, capacity=32, micro_batch_size=8, progress=False,
             report_to="none")


def _rows(n=32, **extra):
    return [{"question": p.question, "answer": p.answer, "solution": p.answer, **extra}
            for p in TASKS["add"].split("train", n, seed=0)]


# -- the Python API ------------------------------------------------------------------------------

def test_config_keywords_resolve_to_fields():
    args = ReValConfig(algo="grpo", beta=0.02, learning_rate=1e-5, num_generations=4, output_dir="runs/x",
                       **{"rollout.prompts_per_round": 8})
    assert isinstance(args, TrainConfig)
    assert (args.algo, args.loss.beta, args.optim.lr, args.rollout.samples_per_prompt, str(args.out),
            args.rollout.prompts_per_round) == ("grpo", 0.02, 1e-5, 4, "runs/x", 8)
    assert config_key("lr") == "optim.lr" and config_key("temperature") == "rollout.temperature"
    with pytest.raises(ValueError, match="unknown setting 'betta'"):
        ReValConfig(betta=0.1)
    cfg = TrainConfig()  # every field's own name is unique across sections, so it alone names it
    for section in (f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))):
        for leaf in dataclasses.fields(getattr(cfg, section)):
            assert config_key(leaf.name) == f"{section}.{leaf.name}"


def test_trainer_passes_every_column_to_callable_rewards(tmp_path):
    seen = []

    def uses_solution(completions, solution, difficulty, answer, question, **kwargs):
        seen.append((len(completions), solution[0], difficulty[0], sorted(kwargs)))
        return [1.0 if f"{{{s}}}" in c else 0.0 for c, s in zip(completions, solution)]

    trainer = ReValTrainer(reward_funcs=uses_solution, train_dataset=_rows(difficulty="easy"),
                           args=ReValConfig(output_dir=tmp_path / "run", **SMALL))
    result = trainer.train()
    assert result["round"] == 2 and len(seen) == 2
    assert all(n == 16 and d == "easy" and rest == [] for n, _, d, rest in seen)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]  # no evaluation without an eval_dataset
    assert max(r["rollout/reward_mean"] for r in rows) > 0  # the shipped model answers in the boxed format


def test_trainer_takes_a_dataset_a_path_a_model_object_and_registry_names(tmp_path):
    import datasets

    from reval.model import default_model_path, load_model

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    model, tok = load_model(default_model_path("add"))
    for i, data in enumerate((datasets.Dataset.from_list(_rows()), str(path))):
        out = tmp_path / f"run{i}"
        trainer = ReValTrainer(model=model if i == 0 else None, processing_class=tok, reward_funcs=["arithmetic"],
                               train_dataset=data, eval_dataset=_rows(8), args=ReValConfig(output_dir=out, **SMALL))
        assert len(trainer.train_problems) == 32
        assert trainer.train_problems[0].columns == {"solution": _rows()[0]["solution"]}
        result = trainer.train()
        assert "eval/accuracy" in result
    assert (tmp_path / "run0" / "start-model" / "config.json").exists()  # the model object, saved for resume
    with pytest.raises(ValueError, match="processing_class"):
        ReValTrainer(model=model, train_dataset=_rows())
    with pytest.raises(ValueError, match="unknown reward function 'nope'"):
        ReValTrainer(reward_funcs=["nope"])


def test_the_trainer_is_the_one_loop(monkeypatch):
    import reval.train

    calls = []
    monkeypatch.setattr(reval.train, "train", lambda cfg, **kw: calls.append((cfg, kw)) or {"round": 0})
    args = ReValConfig(**SMALL)
    ReValTrainer(reward_funcs=[len], train_dataset=_rows(), args=args).train()
    (cfg, kw), = calls
    assert cfg is args and kw["reward_funcs"] == [len] and len(kw["problems"]) == 32 and kw["resume"] is False


# -- silent failures, made loud ------------------------------------------------------------------

def test_a_reward_that_raises_is_shown_once_with_its_exception(tmp_path, capsys):
    def needs_solution(completions, solution, **_):
        return [0.0 for _ in completions]

    rows = [{"question": r["question"], "answer": r["answer"]} for r in _rows()]
    args = ReValConfig(output_dir=tmp_path / "run", **{**SMALL, "rounds": 3})
    with pytest.raises(ValueError, match="no answer could be scored in 3 rounds in a row"):
        ReValTrainer(reward_funcs=needs_solution, train_dataset=rows, args=args).train()
    err = capsys.readouterr().err
    assert err.count("failed on an answer") == 1
    assert "<locals>.needs_solution failed on an answer: TypeError" in err and "'solution'" in err


def test_rounds_without_a_learning_signal_are_reported(tmp_path, capsys):
    args = ReValConfig(output_dir=tmp_path / "run", **{**SMALL, "rounds": 3})
    ReValTrainer(reward_funcs=lambda completions, **_: [0.0] * len(completions), train_dataset=_rows(),
                 args=args).train()
    err = capsys.readouterr().err
    assert "WARNING: rounds 1-3: every answer got reward 0, so there is nothing to learn" in err
    assert "task.prompt = 'plain'" in err


def test_own_data_with_the_shipped_model_is_prompted_as_in_eval(tmp_path):
    """`auto` resolves the same way in train and eval: the shipped model's own format, so its
    answers score from the first round (it used to get the paper's chat prompt and reward 0)."""
    from reval.model import auto_prompt

    assert auto_prompt(chat=False) == "plain" and auto_prompt(chat=True) == "paper"
    assert auto_prompt(chat=True, embedded=True) == "plain"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "run"
    proc = subprocess.run([*CMD, "train", "--task.data", str(data), "--rounds", "1", "--rollout.prompts-per-round", "8",
                           "--rollout.samples-per-prompt", "4", "--buffer.capacity", "32", "--no-progress",
                           "--rollout.max-new-tokens", "40", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["rollout/reward_mean"] > 0.2


# -- your own reward from the command line ---------------------------------------------------------

def test_cli_loads_a_reward_from_a_file_and_resume_asks_to_name_it_again(tmp_path):
    reward = tmp_path / "my_rewards.py"
    reward.write_text("def boxed(completions, solution, **kw):\n"
                      "    return [1.0 if '{' + s + '}' in c else 0.0 for c, s in zip(completions, solution)]\n")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    out = tmp_path / "run"
    ref = f"{reward}:boxed"
    base = ["--task.data", str(data), "--rollout.prompts-per-round", "4", "--rollout.samples-per-prompt", "4",
            "--buffer.capacity", "32", "--no-progress", "--rollout.max-new-tokens", "40", "--report-to", "none"]
    proc = subprocess.run([*CMD, "train", *base, "--rounds", "1", "--task.rewards", ref, "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["task"]["rewards"] == [ref]
    proc = subprocess.run([*CMD, "train", "--resume", str(out), "--rounds", "2"], capture_output=True, text=True)
    assert proc.returncode != 0 and "name it again to confirm you trust it: --task.rewards" in proc.stderr
    proc = subprocess.run([*CMD, "train", "--resume", str(out), "--rounds", "2", "--task.rewards", ref],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([*CMD, "train", *base, "--task.rewards", f"{reward}:nope", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "has no function 'nope' (it has: boxed)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


# -- a command line that answers at once -----------------------------------------------------------

def test_help_and_argument_errors_do_not_load_torch():
    """`--help` and bad arguments answer before torch and transformers load (seconds, not tens)."""
    code = ("import sys\nfrom reval.cli import main\nfor argv in {argvs!r}:\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        print(e, file=sys.stderr)\n"
            "print('LOADED', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    argvs = [["train", "--help"], ["eval", "--help"], ["plot", "--help"], ["train", "--loss.beta", "-1"],
             ["train", "--bogus"], ["eval", "--data", "x.jsonl", "--dtype", "float64"], ["--version"]]
    proc = subprocess.run([sys.executable, "-c", code.format(argvs=argvs)], capture_output=True, text=True)
    assert "LOADED []" in proc.stdout, proc.stdout[-500:] + proc.stderr[-2000:]
    assert "--config FILE.yaml|PRESET" in proc.stdout and "--resume DIR" in proc.stdout
    assert "loss.beta = -1.0 is invalid" in proc.stderr and "--dtype 'float64'" in proc.stderr


def test_eval_shows_progress_and_names_its_own_flags(tmp_path, capsys):
    from reval.cli import main

    good = tmp_path / "bench.jsonl"
    good.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in _rows(4)))
    main(["eval", "--data", str(good)])
    assert "problem" in capsys.readouterr().err  # tqdm: 4/4 [..., problem/s]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1"}\n')
    with pytest.raises(SystemExit) as e:
        main(["eval", "--data", str(bad)])
    assert "--preset" in str(e.value) and "--skip-bad-rows" in str(e.value) and "task." not in str(e.value)


# -- trackers ----------------------------------------------------------------------------------------

def test_report_to_sends_metrics_to_accelerate_trackers(tmp_path, monkeypatch):
    import accelerate.tracking
    import accelerate.utils

    logged = []

    class FakeTracker:
        name, requires_logging_directory = "tensorboard", True

        def __init__(self, run_name, logging_dir):
            logged.append(("init", run_name, logging_dir))

        def start(self):
            pass

        def store_init_configuration(self, config):
            logged.append(("config", config["loss.beta"]))

        def log(self, values, step):
            logged.append(("log", step, sorted(values)[:1]))

        def finish(self):
            logged.append(("finish",))

    monkeypatch.setitem(accelerate.tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", FakeTracker)
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    ReValTrainer(reward_funcs=["arithmetic"], train_dataset=_rows(),
                 args=ReValConfig(output_dir=tmp_path / "run", **{**SMALL, "report_to": "tensorboard"})).train()
    assert logged[0] == ("init", "tensorboard", str(tmp_path / "run")) and logged[1] == ("config", 0.05)
    assert [x[1] for x in logged if x[0] == "log"] == [16, 32] and logged[-1] == ("finish",)
    with pytest.raises(ValueError, match=r'report_to wandb: wandb is not installed; pip install -e "\.\[wandb\]"'):
        ReValTrainer(train_dataset=_rows(),
                     args=ReValConfig(output_dir=tmp_path / "w", **{**SMALL, "report_to": "wandb"})).train()
    with pytest.raises(ValueError, match="report_to = 'comet' is invalid"):
        ReValConfig(report_to="comet").validate()


# -- resuming what was given from Python, and what a run directory may not switch on ----------------

def test_resume_without_the_python_inputs_is_refused(tmp_path):
    from reval.cli import main

    def solution_reward(completions, solution, **_):
        return [1.0 if f"{{{s}}}" in c else 0.0 for c, s in zip(completions, solution)]

    out = tmp_path / "run"
    args = ReValConfig(output_dir=out, reward_weights=[1.0], checkpoint_every=1, **SMALL)  # weights: one per func
    trainer = ReValTrainer(reward_funcs=[solution_reward], train_dataset=_rows(), eval_dataset=_rows(8), args=args)
    result = trainer.train()
    assert result["eval/accuracy"] > 0  # the verifier got the eval rows' solution column too
    with pytest.raises(ValueError, match="differ now .*problems: the run had 32 problems"):
        ReValTrainer(reward_funcs=[solution_reward], train_dataset=_rows(16),
                     args=ReValConfig(output_dir=out, reward_weights=[1.0], **{**SMALL, "rounds": 3})
                     ).train(resume_from_checkpoint=True)
    with pytest.raises(SystemExit, match="name it again to confirm you trust it"):
        main(["train", "--resume", str(out), "--rounds", "3"])
    args = ReValConfig(output_dir=out, reward_weights=[1.0], **{**SMALL, "rounds": 3})
    assert ReValTrainer(reward_funcs=[solution_reward], train_dataset=_rows(), eval_dataset=_rows(8),
                        args=args).train(resume_from_checkpoint=True)["round"] == 3


def test_a_saved_trust_remote_code_is_not_honoured_on_resume(tiny_dir, tmp_path, monkeypatch):
    import reval.train as train_mod
    from reval.cli import main

    out = tmp_path / "run"
    main(["train", "--model.path", str(tiny_dir), "--rounds", "1", "--rollout.prompts-per-round", "4",
          "--rollout.samples-per-prompt", "4", "--buffer.capacity", "32", "--no-progress", "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    config["model"]["trust_remote_code"] = True  # someone edits the shared run directory
    (out / "config.json").write_text(json.dumps(config))
    seen = []
    real = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda cfg, **kw: seen.append(cfg.model.trust_remote_code) or real(cfg, **kw))
    main(["train", "--resume", str(out), "--rounds", "2"])
    assert seen == [False]
    assert json.loads((out / "config.json").read_text())["model"]["trust_remote_code"] is False


def test_one_answer_per_prompt_warns_only_when_every_answer_scores_alike(tmp_path, capsys):
    G1 = {**SMALL, "rounds": 3, "num_generations": 1, "prompts_per_round": 16}
    ReValTrainer(reward_funcs=lambda completions, **_: [float(i % 2) for i in range(len(completions))],
                 train_dataset=_rows(), args=ReValConfig(output_dir=tmp_path / "a", **G1)).train()
    assert "WARNING" not in capsys.readouterr().err
    ReValTrainer(reward_funcs=lambda completions, **_: [0.0] * len(completions),
                 train_dataset=_rows(), args=ReValConfig(output_dir=tmp_path / "b", **G1)).train()
    assert "WARNING: rounds 1-3: every answer got reward 0" in capsys.readouterr().err
