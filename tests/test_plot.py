"""`reval plot` and `reval --version`: quick commands that need no model."""

import json

import pytest

from reval.cli import main


def _run(path, accuracies, rewards):
    path.mkdir()
    rows = []
    for i, (acc, rew) in enumerate(zip(accuracies, rewards)):
        rows.append({"round": i, "samples": 16 * i, "seconds": 1.5 * i, "eval/accuracy": acc})
        rows.append({"round": i + 1, "samples": 16 * (i + 1), "seconds": 1.5 * (i + 1), "rollout/reward_mean": rew})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"round": 9, "torn')
    return path


def test_plot_draws_runs_against_answers_and_seconds(tmp_path, capsys):
    a = _run(tmp_path / "reval", [0.3, 0.5, 0.7], [0.2, 0.4, 0.6])
    b = _run(tmp_path / "grpo", [0.3, 0.4, 0.5], [0.2, 0.3, 0.4])
    main(["plot", str(a), str(b / "metrics.jsonl"), "--out", str(tmp_path / "cmp.png")])
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out
    main(["plot", str(a)])  # default: plot.png in the first run
    assert (a / "plot.png").stat().st_size > 10_000


def test_plot_errors_name_the_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="no metrics.jsonl there"):
        main(["plot", str(tmp_path)])
    run = _run(tmp_path / "run", [0.5], [0.5])
    with pytest.raises(SystemExit, match="--metric eval/mean@8: no run logged it"):
        main(["plot", str(run), "--metric", "eval/mean@8"])


def test_version(capsys):
    from reval import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"reval {__version__}"
