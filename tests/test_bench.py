"""The benchmark's bookkeeping: targets, answers to target, ratios with their spread (no training)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench"] = bench  # dataclasses look their module up
spec.loader.exec_module(bench)


def _write(out: Path, study: str, method: str, seed: int, accs: list[float], k: int = 1,
           seconds_per_round: float = 2.0, answers_per_round: int = 128, algo: str | None = None) -> None:
    curve = [{"round": i, "samples": i * answers_per_round, "seconds": i * seconds_per_round, "accuracy": a}
             for i, a in enumerate(accs)]
    result = {"curve": curve, "generate_seconds": 1.0, "update_seconds": 2.0, "peak_rss_mb": 900.0,
              "spec": {"method": method, "seed": seed, "k": k, "lr": 3e-4, "algo": algo or method}}
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "raw" / f"{study}__{method}-k{k}-s{seed}.json").write_text(json.dumps(result))


@pytest.fixture()
def results(tmp_path):
    for seed in (0, 1):
        _write(tmp_path, "main", "reval", seed, [0.3, 0.9, 0.96, 0.98], k=2, seconds_per_round=4.0)
        _write(tmp_path, "main", "grpo", seed, [0.3, 0.5, 0.9, 0.9 + 0.02 * seed])
        _write(tmp_path, "main", "trl_grpo", seed, [0.3, 0.4, 0.5, 0.8 if seed else 0.86])
        _write(tmp_path, "n1", "reval", seed, [0.3, 0.5, 0.8, 0.9], k=8, seconds_per_round=3.0)
        _write(tmp_path, "n1", "grpo", seed, [0.3, 0.4, 0.6, 0.9])
    (tmp_path / "tuning.json").write_text(json.dumps({"tuned_on": "validation", "winner": {
        "reval": {"lr": 3e-4, "k": 2, "algo": "reval"}},
        "grid": {"reval": [{"lr": 3e-4, "k": 1, "mean_accuracy": 0.5}, {"lr": 3e-4, "k": 2, "mean_accuracy": 0.6}]}}))
    return tmp_path


def test_target_and_answers_to_target(results):
    s = bench.summarise(results)
    # best GRPO variant by mean final accuracy: ours, (0.90 + 0.92) / 2 = 0.91 -> target 0.8645
    assert s["target_accuracy"] == pytest.approx(0.95 * 0.91)
    assert s["samples_to_target"]["reval"] == [128, 128]
    assert s["samples_to_target"]["grpo"] == [256, 256]
    assert s["samples_to_target"]["trl_grpo"] == [None, None]  # never reached: recorded as null
    assert s["seconds_to_target"]["reval"] == [4.0, 4.0] and s["seconds_to_target"]["grpo"] == [4.0, 4.0]
    assert s["final_accuracy"]["trl_grpo"] == [0.86, 0.8]
    assert s["answers_ratio_vs_reval"]["grpo"]["ratio"] == 2.0
    assert not s["answers_ratio_vs_reval"]["grpo"]["censored"]
    # TRL never got there: counted as one round past the budget (512 answers), a lower bound
    assert s["answers_ratio_vs_reval"]["trl_grpo"] == {"ratio": 4.0, "per_seed_min": 4.0, "per_seed_max": 4.0,
                                                       "bootstrap_90": [4.0, 4.0], "censored": True}
    assert s["seconds_ratio_vs_reval"]["grpo"]["ratio"] == 1.0
    assert s["tuned_on"] == "validation" and s["K"]["reval"] == 2 and s["lr"]["reval"] == 3e-4
    assert s["peak_rss_mb"]["reval"] == [900, 900]


def test_n1_rounds_to_target(results):
    n1 = bench.summarise(results)["n1"]
    assert n1["target_accuracy"] == pytest.approx(0.95 * 0.9)  # GRPO's mean final at N = 1
    assert n1["rounds_to_target"] == {"reval": [3, 3], "grpo": [3, 3]}
    assert n1["grpo_over_reval_rounds"]["ratio"] == 1.0
    assert n1["grpo_over_reval_seconds"]["ratio"] == pytest.approx(6.0 / 9.0, abs=0.01)


def test_ratio_spread_pairs_seeds_and_bootstraps():
    s = bench.ratio_spread([200, 400, 600], [100, 100, 200], never=1000)
    assert s["ratio"] == 3.0 and s["per_seed_min"] == 2.0 and s["per_seed_max"] == 4.0
    assert s["bootstrap_90"][0] <= 3.0 <= s["bootstrap_90"][1] and not s["censored"]


def test_report_writes_summary_and_plots(results):
    bench.report(results)
    for name in ("summary.json", "accuracy_vs_answers.png", "accuracy_vs_seconds.png", "tuning.png", "n1.png"):
        assert (results / name).stat().st_size > 0
    md = (results / "summary.md").read_text()
    assert "| reval | reval | 0.0003 | 2 | 128 / 128 | 4 / 4 | 98% / 98% | 98.0% |" in md
    assert "| grpo / reval | 2.00x (seeds 2.00-2.00" in md and "| trl_grpo / reval | >= 4.00x" in md
    assert json.loads((results / "summary.json").read_text())["target_accuracy"] > 0


def test_claims_compare_with_the_tuned_row_cut_to_their_length(results):
    # an ablation of 2 rounds next to the main study's 3-round ReVal runs, seed 0 only
    _write(results, "claims", "reval_beta0.2", 0, [0.3, 0.5, 0.7], k=2)
    for f in (results / "raw").glob("claims__*"):
        r = json.loads(f.read_text())
        r["spec"].update(label="reval_beta0.2", rounds=2, overrides={"loss.beta": 0.2})
        f.write_text(json.dumps(r))
    claims = bench.summarise(results)["claims"]
    assert claims["reval (tuned)"]["seeds"] == [0]
    assert claims["reval (tuned)"]["final_accuracy"] == [0.96]  # round 2 of [0.3, 0.9, 0.96, 0.98]
    assert claims["reval_beta0.2"]["final_accuracy"] == [0.7]
    assert claims["reval_beta0.2"]["overrides"] == {"loss.beta": 0.2}
    assert claims["reval (tuned)"]["samples_to_target"] == [128] and claims["reval_beta0.2"]["samples_to_target"] == [None]


def test_claim_variants_change_one_thing_each():
    tuning = {"winner": {"reval": {"lr": 1e-4, "k": 8}},
              "grid": {"tbrm": [{"lr": 1e-4, "k": 2, "mean_accuracy": 0.3}, {"lr": 3e-4, "k": 4, "mean_accuracy": 0.1}]}}
    v = bench.claim_variants(tuning, "mul", reset_every=4)
    assert v["reval_K1"] == ("reval", 1, 1e-4, {}) and "reval_K8" not in v
    assert v["reval_reset4"] == ("reval", 8, 1e-4, {"loss.ref_reset_every": 4})
    assert v["tbrm_replay"] == ("tbrm", 2, 1e-4, {})
    assert set(bench.claim_variants(None, "add")) == {"reval_beta0.02", "reval_beta0.05", "reval_beta0.2"}


def test_tbrm_reuse_is_tbrm_with_replay():
    assert bench.algo_of("tbrm", 1) == "tbrm" and bench.algo_of("tbrm", 4) == "tbrm_replay"
    assert bench.algo_of("reval", 8) == "reval" and bench.algo_of("grpo", 2) == "grpo"


def test_ratio_and_first_reaching():
    assert bench.ratio([100, 300], [100, 100]) == 2.0
    assert bench.ratio([100, None], [100, 100]) is None
    curve = [{"round": 0, "samples": 0, "accuracy": 0.2}, {"round": 1, "samples": 16, "accuracy": 0.95}]
    assert bench.rounds_to(curve, 0.95) == 1 and bench.first_reaching(curve, 0.96, "samples") is None


# -- the replay study's staged search (benchmarks/replay_study.py), with scores made up ---------------

def _replay_study(monkeypatch, score_of):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    spec = importlib.util.spec_from_file_location("replay_study", Path(__file__).parents[1] / "benchmarks"
                                                  / "replay_study.py")
    rs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rs)
    calls = []

    def fake_launch(specs, workers, fresh):
        calls.extend(specs)
        return [{"curve": [{"accuracy": 0.0}, {"accuracy": score_of(s)}]} for s in specs]

    monkeypatch.setattr(rs, "launch", fake_launch)
    return rs, calls


def test_replay_grid_stages_build_on_each_other(monkeypatch, tmp_path):
    """A picks lr x K at 16 x 8, B varies the shape at A's winner, C (ReVal only) the buffer, the reset
    and then the sampling at C's best, D re-runs each method's top two on seeds 1 and 2; every run
    has its own result file; the winner is the best 3-seed mean."""
    def score_of(s):
        base = {"reval": 0.6, "grpo": 0.5, "trl_grpo": 0.55}[s.method] - abs(s.lr - 1e-4) * 100
        if s.samples_per_prompt == 4:
            base += 0.02  # 32 x 4 is better
        if s.overrides.get("buffer.capacity") == 1280 and s.overrides.get("loss.ref_reset_every") == 10:
            base += 0.03
        if s.overrides.get("buffer.sampling") == "recency":
            base += 0.01
        if s.seed and s.method == "grpo" and s.samples_per_prompt == 4:
            base -= 0.2  # seed 0 flattered 32 x 4
        return base + (0.001 * s.k if s.method != "grpo" else -0.001 * s.k)

    rs, calls = _replay_study(monkeypatch, score_of)
    stages = rs.grid(tmp_path, 2, False, False)
    assert len({s.result for s in calls}) == len(calls) == 62
    assert stages["A"]["reval"]["lr"] == 1e-4 and stages["A"]["reval"]["k"] == 8 and stages["A"]["reval"]["G"] == 8
    assert stages["B"]["reval"]["G"] == 4  # the shape moved, at A's lr and K
    c = stages["C"]["reval"]
    assert c["G"] == 4 and c["overrides"] == {"buffer.capacity": 1280, "loss.ref_reset_every": 10,
                                              "buffer.sampling": "recency"}
    assert {s.method for s in calls if "gridC" in s.result} == {"reval"}
    d = [s for s in calls if "gridD" in s.result]
    assert sorted({s.seed for s in d}) == [1, 2] and len(d) == 3 * 2 * 2
    assert stages["B"]["grpo"]["G"] == 4 and stages["D"]["grpo"]["G"] == 8  # won seed 0, not the 3-seed mean
    assert all(s.split == "validation" for s in calls)
    assert json.loads((tmp_path / "grid.json").read_text())["stages"]["D"] == stages["D"]


def test_replay_report_tables_every_grid_run_best_first(monkeypatch, tmp_path):
    rs, _ = _replay_study(monkeypatch, lambda s: 0.0)
    (tmp_path / "raw").mkdir()
    for i, (lr, acc) in enumerate([(1e-4, 0.5), (3e-4, 0.7)]):
        spec = {"method": "reval", "lr": lr, "k": 8, "seed": 0, "prompts_per_round": 32, "samples_per_prompt": 4,
                "overrides": {"buffer.capacity": 1280} if i else {}, "label": "reval_G4"}
        (tmp_path / "raw" / f"gridA__{i}.json").write_text(json.dumps(
            {"spec": spec, "curve": [{"accuracy": 0.2}, {"accuracy": acc}, {"accuracy": acc}], "cpu_seconds": 99.6}))
    md = rs.markdown(rs.report(tmp_path))
    best = md.index("| reval | lr 0.0003, K 8, 32 x 4, capacity 1280 | 0.700 | 0.700 | 100 |")
    assert best < md.index("| reval | lr 0.0001, K 8, 32 x 4 | 0.500 | 0.500 | 100 |")


def test_replay_main_study_runs_the_grid_winners_on_test_and_keeps_the_summary_keys(monkeypatch, tmp_path):
    """Section 4: each method's stage-D setting (lr, K, shape, overrides) on 5 test seeds; the summary has
    every key of the earlier main study's (benchmarks/results/mul/summary.json), so the two compare."""
    rs, _ = _replay_study(monkeypatch, lambda s: 0.0)
    winners = {"reval": {"method": "reval", "lr": 5e-5, "k": 8, "G": 4, "seed": 0,
                         "overrides": {"buffer.capacity": 1280, "buffer.sampling": "recency"}},
               "grpo": {"method": "grpo", "lr": 1e-4, "k": 2, "G": 8, "seed": 0, "overrides": {}},
               "trl_grpo": {"method": "trl_grpo", "lr": 3e-5, "k": 4, "G": 2, "seed": 0, "overrides": {}}}
    with pytest.raises(SystemExit, match="run `python benchmarks/replay_study.py grid` first"):
        rs.main_study(tmp_path, 2, False, False)
    (tmp_path / "grid.json").write_text(json.dumps({"split": "validation", "stages": {"D": winners}}))
    calls = []
    speed = {"reval": 2, "grpo": 1, "trl_grpo": 1}  # ReVal reaches each accuracy in half the rounds

    def fake_launch(specs, workers, fresh):
        calls.extend(specs)
        for s in specs:
            curve = [{"round": r, "samples": 128 * r, "seconds": 10.0 * r,
                      "accuracy": min(0.3 + 0.02 * r * speed[s.method], 0.8)} for r in range(s.rounds + 1)]
            res = {"curve": curve, "spec": {"label": s.label, "method": s.method, "lr": s.lr, "k": s.k,
                                            "seed": s.seed, "algo": s.algo},
                   "generate_seconds": 1.0, "update_seconds": 2.0, "peak_rss_mb": 100.0}
            Path(s.result).parent.mkdir(parents=True, exist_ok=True)
            Path(s.result).write_text(json.dumps(res))
        return []

    monkeypatch.setattr(rs, "launch", fake_launch)
    summary = rs.main_study(tmp_path, 2, False, False)
    assert len(calls) == 15 and {s.split for s in calls} == {"test"} and {s.seed for s in calls} == {0, 1, 2, 3, 4}
    assert all(s.rounds == 24 and s.num_eval == 200 for s in calls)
    reval = [s for s in calls if s.method == "reval"]
    assert all(s.samples_per_prompt == 4 and s.prompts_per_round == 32 and s.k == 8 and s.lr == 5e-5
               and s.overrides == winners["reval"]["overrides"] for s in reval)
    assert all(s.samples_per_prompt == 2 and s.k == 4 for s in calls if s.method == "trl_grpo")
    earlier = json.loads((Path(__file__).parents[1] / "benchmarks/results/mul/summary.json").read_text())
    main_keys = set(earlier) - {"n1", "why", "claims"}
    assert main_keys <= set(summary)
    assert summary["answers_ratio_vs_reval"]["grpo"]["ratio"] > 1.5
    assert summary["tuning_winners"]["reval"]["G"] == 4
    assert (tmp_path / "main" / "summary.json").exists()


# -- the latent-action study (benchmarks/latent_study.py), with scores made up ------------------------

def test_latent_study_tunes_each_space_alike_and_runs_the_winners_with_their_measures(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("latent_study", Path(__file__).parents[1] / "benchmarks"
                                                  / "latent_study.py")
    ls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ls)
    calls = []
    best = {"token_reval": 3e-4, "latent_reval": 1e-3, "token_grpo": 1e-4, "latent_grpo": 3e-4}

    def fake_launch(specs, workers, fresh):
        calls.extend(specs)
        out = []
        for s in specs:
            acc = 0.5 - abs(s.lr - best[s.label]) + 0.01 * s.seed
            res = {"curve": [{"accuracy": 0.3, "samples": 0, "seconds": 0.0},
                             {"accuracy": acc, "samples": 3072, "seconds": 600.0}],
                   "spec": {"label": s.label, "lr": s.lr, "k": s.k, "seed": s.seed}, "diversity": 2.0 + s.seed,
                   "held_add": 0.0, "cpu_seconds": 700.0 + s.seed, "generate_seconds": 100.0,
                   "update_seconds": 400.0}
            Path(s.result).parent.mkdir(parents=True, exist_ok=True)
            Path(s.result).write_text(json.dumps(res))
            out.append(res)
        return out

    monkeypatch.setattr(ls, "launch", fake_launch)
    winners = ls.tune(tmp_path, 2, False, False)
    assert len(calls) == 2 * 2 * 3 and {s.split for s in calls} == {"validation"}
    assert {k: w["lr"] for k, w in winners.items()} == best
    latent = [s for s in calls if s.label.startswith("latent")]
    assert all(s.overrides == {"model.path": str(ls.latent_dir(tmp_path))} for s in latent)
    assert all(not s.overrides for s in calls if s.label.startswith("token"))
    assert {(s.label, s.k) for s in calls} >= {("latent_reval", 8), ("token_grpo", 2)}
    calls.clear()
    ls.run(tmp_path, 2, False, False)
    assert len(calls) == 4 * 3 and {s.split for s in calls} == {"test"}
    assert all(s.lr == best[s.label] and set(s.measures) == {"diversity", "held_add"} for s in calls)
    calls.clear()
    probe = ls.edge(tmp_path, 2, False, False)  # the grid's low edge, probed alike; the winners stay
    assert len(calls) == 4 and {(s.split, s.lr, s.seed) for s in calls} == {("validation", 5e-5, 0)}
    assert probe["token_grpo"]["score"] == round(0.5 - abs(5e-5 - 1e-4), 4)
    assert probe["token_grpo"]["winner_lr"] == 1e-4
    summary = ls.report(tmp_path)
    assert summary["edge"] == probe
    seeds = summary["methods"]["latent_reval"]["per_seed"]
    assert set(seeds) == {"0", "1", "2"} and seeds["2"]["diversity"] == 4.0
    assert seeds["0"]["accuracy_per_1k_answers"] == round(1000 * 0.2 / 3072, 4)
    table = (tmp_path / "summary.md").read_text().splitlines()
    row = next(line for line in table if line.startswith("| latent_reval |"))
    assert "| 3 [2, 4] |" in row and "| 701 [700, 702] |" in row  # distinct of 8, CPU s: median [min, max]
    assert sum(line.startswith("| token_") or line.startswith("| latent_") for line in table) == 4


def test_latent_study_reuses_only_an_identical_finished_run(tmp_path):
    """A token run the replay grid already made (same spec but its names; an older spec without the
    later `measures` field) is copied, not run again; a run differing in anything else is not."""
    spec = importlib.util.spec_from_file_location("latent_study", Path(__file__).parents[1] / "benchmarks"
                                                  / "latent_study.py")
    ls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ls)
    from dataclasses import asdict

    specs = ls._specs(tmp_path / "latent", "tune", [("reval", "token", 0, 1e-4), ("reval", "token", 0, 3e-4)],
                      False, "validation", 100, 2)
    done = tmp_path / "replay" / "raw"
    done.mkdir(parents=True)
    for i, (s, lr) in enumerate(zip(specs, (1e-4, 1e-3))):
        old = {k: v for k, v in asdict(s).items() if k != "measures"} | {"label": "reval_G8", "lr": lr,
                                                                          "result": "x", "run_dir": "y"}
        (done / f"{i}.json").write_text(json.dumps({"curve": [{"accuracy": 0.1 * (i + 1)}], "spec": old}))
    copied = ls.reuse_identical(specs, done)
    assert copied == [specs[0].result]
    res = json.loads(Path(specs[0].result).read_text())
    assert res["curve"] == [{"accuracy": 0.1}] and res["spec"]["label"] == "token_reval"
    assert res["spec"]["reused_from"] == str(done / "0.json") and not Path(specs[1].result).exists()
    assert ls.reuse_identical(specs, done) == []  # never over an existing result
