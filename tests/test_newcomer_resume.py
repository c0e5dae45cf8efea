"""Issue 25, a newcomer's first hour: resuming from any directory, a failed first start that does
not block its own --out, round numbers counted one way, and a resume that says what it does.

The runs go through the command line in this process (`reval.cli.main`), as a user types them."""

import json

import pytest

from reval.cli import main

SMALL = ["--rollout.prompts-per-round", "4", "--rollout.samples-per-prompt", "2", "--buffer.capacity", "16",
         "--optim.micro-batch-size", "8", "--rollout.max-new-tokens", "8", "--checkpoint-every", "2",
         "--no-progress", "--report-to", "none"]

REWARDS = '''
def fn(completions, answer, **_):
    return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]


def broken(completions, **_):
    raise RuntimeError("boom")
'''


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A user's project directory: tiny addition problems (add.csv) and a reward file
    (my_reward.py), the current directory."""
    home = tmp_path / "project"
    home.mkdir()
    rows = [f"{a} + {b} = ?,{a + b}" for a in range(10, 14) for b in range(20, 24)]
    (home / "add.csv").write_text("question,answer\n" + "\n".join(rows) + "\n")
    (home / "my_reward.py").write_text(REWARDS)
    monkeypatch.chdir(home)
    return home


def train(*args):
    main(["train", *map(str, args)])


def _rounds(run):
    return [r["round"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "rollout/reward_mean" in r]


# -- 8. resume from any directory -----------------------------------------------------------------

def test_a_run_started_with_relative_paths_resumes_from_another_directory(project, tiny_dir, tmp_path,
                                                                          monkeypatch):
    run = tmp_path / "run"
    train("--model.path", tiny_dir, "--task.data", "add.csv", "--task.rewards", "my_reward.py:fn",
          "--rounds", "2", "--out", run, *SMALL)
    saved = json.loads((run / "config.json").read_text())
    assert saved["task"]["data"] == str(project / "add.csv")
    assert saved["task"]["rewards"] == [f"{project / 'my_reward.py'}:fn"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train("--resume", run, "--rounds", "3", "--task.rewards", f"{project / 'my_reward.py'}:fn")
    assert _rounds(run) == [1, 2, 3]
    monkeypatch.chdir(project)  # the same file by its relative name is the same value
    train("--resume", run, "--rounds", "4", "--task.rewards", "my_reward.py:fn")
    assert _rounds(run) == [1, 2, 3, 4]


def test_an_old_run_with_relative_paths_says_where_they_are_read_from(project, tiny_dir, tmp_path, monkeypatch):
    run = tmp_path / "old"
    train("--model.path", tiny_dir, "--task.data", "add.csv", "--rounds", "2", "--out", run, *SMALL)
    config = json.loads((run / "config.json").read_text())
    config["task"]["data"] = "add.csv"  # as runs saved it before paths were made absolute
    (run / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SystemExit) as e:
        train("--resume", run, "--rounds", "3")
    assert "task.data = 'add.csv'" in str(e.value) and "relative to the directory the run started in" \
        in str(e.value) and str(elsewhere) in str(e.value)


# -- 9. a run that fails before its first checkpoint ----------------------------------------------

def test_a_start_that_failed_in_its_first_round_does_not_block_its_out(project, tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--model.path", tiny_dir, "--task.data", "add.csv", "--rounds", "2", "--out", run, *SMALL]
    with pytest.raises(SystemExit, match="no answer could be scored"):
        train(*common, "--task.rewards", "my_reward.py:broken", "--rollout.max-unscored-rounds", "1")
    assert (run / "config.json").exists()
    capsys.readouterr()
    train(*common, "--task.rewards", "my_reward.py:fn")  # the fixed reward, the same --out
    assert f"{run} holds no checkpoint and no logged round" in capsys.readouterr().err
    assert _rounds(run) == [1, 2]
    assert json.loads((run / "config.json").read_text())["task"]["rewards"] == [f"{project / 'my_reward.py'}:fn"]


def test_a_run_with_logged_rounds_but_no_checkpoint_says_so(project, tiny_dir, tmp_path):
    run = tmp_path / "run"
    common = ["--model.path", tiny_dir, "--task.data", "add.csv", "--rounds", "4", "--out", run, *SMALL,
              "--checkpoint-every", "0"]
    with pytest.raises(SystemExit, match="no answer could be scored"):
        train(*common, "--task.rewards", "my_reward.py:broken", "--rollout.max-unscored-rounds", "2")
    assert _rounds(run) == [1]
    with pytest.raises(SystemExit) as e:
        train(*common, "--task.rewards", "my_reward.py:fn")
    message = str(e.value)
    assert "logged 1 round but has no checkpoint" in message and f"rm -r {run}" in message and "--out" in message
    # resuming it starts over, and may change the config: nothing was learned
    train("--resume", run, "--task.rewards", "my_reward.py:fn")
    assert _rounds(run) == [1, 2, 3, 4]


# -- 10. round numbers: 1-based everywhere, as in metrics.jsonl -----------------------------------

def test_a_reward_that_always_fails_is_reported_with_the_same_round_numbers(project, tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train("--model.path", tiny_dir, "--task.data", "add.csv", "--task.rewards", "my_reward.py:broken",
              "--rounds", "5", "--out", run, *SMALL)
    assert "round 1: reward function" in capsys.readouterr().err  # the first failure
    assert "no answer could be scored in 3 rounds in a row (rounds 1-3; round 3: 8 reward failures among " \
           "8 answers)" in str(e.value)
    assert _rounds(run) == [1, 2]  # rounds 1 and 2 were logged; round 3 stopped the run


# -- 14. resume says where it starts, and when there is nothing to do -----------------------------

def test_resume_says_where_it_starts_and_when_there_is_nothing_to_run(project, tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    train("--model.path", tiny_dir, "--task.data", "add.csv", "--rounds", "2", "--out", run, *SMALL)
    capsys.readouterr()
    train("--resume", run, "--rounds", "3")
    err = capsys.readouterr().err
    assert f"resumed from {run / 'checkpoints' / 'round-000002'} (round 2 of 3 done, 16 answers so far)" in err
    assert _rounds(run) == [1, 2, 3]
    before = [(run / name).read_text() for name in ("config.json", "metrics.jsonl")]
    for rounds in (3, 2):
        train("--resume", run, "--rounds", rounds)  # exits normally: nothing to do is not an error
        out = capsys.readouterr()
        assert f"the run in {run} already has 3 rounds (--rounds {rounds}): nothing to run" in out.err
        assert "--rounds above 3" in out.err and json.loads(out.out)["round"] == 3
        assert [(run / name).read_text() for name in ("config.json", "metrics.jsonl")] == before
