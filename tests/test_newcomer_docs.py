"""A newcomer's first hour (issue 25): the README's example reward on the shipped models'
answers, `reval plot` on offline runs, `reval train --help` at several widths, and the
README's demo table against the demo's own summary."""

import json
import re
from pathlib import Path

import matplotlib.figure
import pytest

from reval.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


# -- the README's example reward ----------------------------------------------------------------

def _readme_example_reward():
    """`my_reward` as the README defines it: its fenced Python block, run as a user would paste it."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    code = next(b for b in blocks if "def my_reward" in b)
    namespace = {}
    exec(compile(code, "README.md:my_reward", "exec"), namespace)
    return namespace["my_reward"]


@pytest.mark.parametrize("task", ["add", "mul"])
def test_readme_example_reward_scores_the_shipped_models_answers_as_the_verifier_does(task):
    from reval.evaluate import evaluate
    from reval.model import default_model_path, eos_token_ids, load_model
    from reval.rewards import correctness_reward
    from reval.tasks import TASKS

    problems = TASKS[task].split("test", 16)
    questions, answers = [p.question for p in problems], [p.answer for p in problems]
    model, tokenizer = load_model(default_model_path(task))
    result = evaluate(model, tokenizer, questions, answers, max_new_tokens=TASKS[task].max_new_tokens,
                      eos_token_ids=eos_token_ids(model, tokenizer), keep_items=True)
    completions = [item["completion"] for item in result["items"]]  # greedy, e.g. "...|\boxed{632}"
    verifier = correctness_reward(completions, answers)
    assert 0 < sum(verifier) < len(verifier)  # right and wrong answers both present
    assert _readme_example_reward()(completions, answer=answers, question=questions) == verifier


# -- reval plot on offline runs -----------------------------------------------------------------

def _offline_run(tiny_dir, tmp_path, algo: str) -> Path:
    import reval.train as train_mod
    from reval.config import TrainConfig

    if algo == "dpo":
        rows = [{"prompt": f"{i}+2", "chosen": f"{i + 2}", "rejected": f"{i + 3} or so"} for i in range(8)]
    else:
        rows = [{"prompt": f"{i}*3", "response": f"{i} * 3 = {3 * i}"} for i in range(8)]
    data = tmp_path / f"{algo}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(algo=algo, rounds=2, out=tmp_path / algo, progress=False, checkpoint_every=0,
                      report_to="none")
    cfg.model.path, cfg.task.data = str(tiny_dir), str(data)
    cfg.rollout.prompts_per_round, cfg.optim.micro_batch_size = 4, 4
    train_mod.train(cfg)
    return cfg.out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def saved_figures(monkeypatch):
    """Every figure `reval plot` saves, kept open for inspection."""
    figures, save = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    return figures


def _drawn(fig) -> list[tuple[str, list, list]]:
    """(x label of the axes' column, x data, y data) of every line in the figure."""
    out = []
    for ax in fig.axes:
        xlabel = ax.get_xlabel() or next((a.get_xlabel() for a in fig.axes  # the top row's is below it
                                          if a.get_subplotspec().colspan == ax.get_subplotspec().colspan
                                          and a.get_xlabel()), "")
        out += [(xlabel, list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]
    return out


def test_plot_draws_offline_runs_against_the_examples_they_learned_from(tiny_dir, tmp_path, saved_figures):
    mle, dpo = _offline_run(tiny_dir, tmp_path, "mle"), _offline_run(tiny_dir, tmp_path, "dpo")
    main(["plot", str(mle), str(dpo), "--out", str(tmp_path / "offline.png")])
    drawn = _drawn(saved_figures[-1])
    for run in (mle, dpo):
        rows = _rows(run)
        losses = [r["loss/total"] for r in rows]
        examples = [(xlabel, xs) for xlabel, xs, ys in drawn if ys == losses]
        assert examples, f"{run.name}'s loss is not drawn"
        assert any(xs == [r["samples"] for r in rows] and "examples" in xlabel for xlabel, xs in examples)

    # --metric takes any metric the run logged, not only eval/ ones
    main(["plot", str(mle), "--metric", "loss/nll", "--out", str(tmp_path / "nll.png")])
    assert any(ys == [r["loss/nll"] for r in _rows(mle)] for _, _, ys in _drawn(saved_figures[-1]))
    with pytest.raises(SystemExit, match=r"--metric eval/mean@8: no run logged it.*mle: .*loss/nll"):
        main(["plot", str(mle), "--metric", "eval/mean@8"])


def test_plot_refuses_to_write_an_empty_figure_and_names_what_the_run_logged(tmp_path):
    run = tmp_path / "odd"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "samples": 4, "seconds": 0.1, "perf/x": 1.0}) + "\n")
    with pytest.raises(SystemExit, match=r"odd: nothing to plot.*logged: perf/x"):
        main(["plot", str(run), "--out", str(tmp_path / "empty.png")])
    assert not (tmp_path / "empty.png").exists()


# -- reval train --help -----------------------------------------------------------------------

def _train_help(columns: int, monkeypatch, capsys, command: str = "train") -> list[str]:
    monkeypatch.setenv("COLUMNS", str(columns))
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out.splitlines()


def _entries(lines: list[str]) -> dict[str, list[str]]:
    """Each option's help lines, by flag, without the box's borders (`│` on a terminal, spaces
    when piped): the lines under a `--flag` line."""
    entries, flag = {}, None
    for body in (line[1:-1] for line in lines):
        if re.match(r" --", body):
            flag = body.split()[0].rstrip(",")
            entries[flag] = []
        elif flag and re.match(r" {5,}\S", body):
            entries[flag].append(body)
        else:
            flag = None
    return entries


def _help_text(entry: list[str]) -> str:
    return " ".join(body.strip() for body in entry)


def test_train_help_names_every_kind_of_reward_and_the_embedded_tasks(monkeypatch, capsys):
    entries = _entries(_train_help(100, monkeypatch, capsys))
    rewards = _help_text(entries["--task.rewards"])
    assert "file.py:fn" in rewards and "module:fn" in rewards and "arithmetic" in rewards
    data = _help_text(entries["--task.data"])
    assert "task.name" in data and "addition task" not in data


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("columns", [80, 100, 120])
def test_train_help_fits_the_terminal_and_wraps_each_option_evenly(columns, command, monkeypatch, capsys):
    lines = _train_help(columns, monkeypatch, capsys, command)
    assert [line for line in lines if len(line) > columns] == []
    entries = _entries(lines)
    assert len(entries) > (50 if command == "train" else 15)
    # greedy wrapping: a help line breaks only where the next word would not have fitted, so
    # no line ends short because the docstring's source had a line break there
    ragged = []
    for flag, entry in entries.items():
        for body, following in zip(entry, entry[1:]):
            width, used = len(body) - 2, len(body.rstrip()) - 1  # a space of padding on each side
            word = following.split()[0]
            word = word[:word.index(",") + 1] if "," in word[:-1] else word  # tyro also breaks after commas
            if used + 1 + len(word) <= width:
                ragged.append(f"{flag}: {body.strip()!r} / {following.strip()!r}")
    assert ragged == []


# -- the README's demo table ----------------------------------------------------------------------

def _demo_table() -> tuple[str, list[list[str]]]:
    """The header and rows of the table under "## Results: `reval demo`"."""
    section = README.read_text(encoding="utf-8").split("## Results: `reval demo`")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in table]
    return table[0], cells[2:]


def test_readme_demo_table_is_docs_demo_summary():
    summary = json.loads((ROOT / "docs/demo/summary.json").read_text())
    header, rows = _demo_table()
    threshold = {s["threshold"] for s in summary.values()}
    assert len(threshold) == 1 and f"answers to {100 * threshold.pop():.0f}%" in header
    assert sorted(r[0].split()[0].lower() for r in rows) == sorted(summary)
    for algo, lr_k, start, final, to_threshold, seconds in rows:
        s = summary[algo.split()[0].lower()]
        lr, k = re.fullmatch(r"(\S+), (\d+) .*", lr_k).groups()
        assert (float(lr), int(k)) == (s["lr"], s["updates_per_round"]), algo
        shape = re.search(r"(\d+) x (\d+)", algo)  # the round's shape, P x G, in the label
        assert shape and tuple(map(int, shape.groups())) == (s["prompts_per_round"], s["samples_per_prompt"]), algo
        assert start == f"{100 * s['initial_accuracy']:.1f}%", algo
        assert final == f"{100 * s['final_accuracy']:.1f}%", algo
        reached = s["samples_to_threshold"]
        assert to_threshold == ("never" if reached is None else f"{reached:,}"), algo
        assert seconds == (f"{s['train_seconds']:.0f} ({s['generate_seconds']:.0f} / "
                           f"{s['update_seconds']:.0f})"), algo
