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
