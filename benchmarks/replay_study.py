"""Study: replay that pays. Our GRPO against TRL's, a wider fair grid, and replay that knows what to replay.

    python benchmarks/replay_study.py parity          # section 1 -> benchmarks/results/replay/
    python benchmarks/replay_study.py variants        # section 3 at the shipped ReVal setting (validation)
    python benchmarks/replay_study.py grid            # sections 2 and 3, stages A-D (validation)
    python benchmarks/replay_study.py main            # section 4: the grid's winners, 5 seeds, test split
    python benchmarks/replay_study.py report          # summary.json / summary.md again from the raw runs
    python benchmarks/replay_study.py parity --quick  # smoke-test size, runs/replay-quick

Every run is one of benchmarks/bench.py's runs (same warm start, prompts drawn in the same order,
reward, budget), a child process on one thread, two at a time; a stage skips runs whose result file
exists, so an interrupted stage continues. Validation split only: nothing here reads the test split.

parity (section 1). Our GRPO with its own std (population, eps 1e-6), our GRPO with TRL's
  (`loss.grpo_std sample`, `loss.grpo_eps 1e-4`) and TRL's GRPOTrainer, at every reuse K in {1, 2, 4},
  lr 1e-4, seeds PARITY_SEEDS, 24 rounds of 16 x 8 answers, greedy accuracy on 100 validation problems
  every 2 rounds. (tests/test_grpo_trl.py shows the loss and gradient are TRL's exactly on the same
  answers; what is left to differ is the std, the random stream of the samples and seed noise.)

variants (section 3, first look). ReVal at the main study's tuned setting (lr 1e-4, K 8, 16 x 8, a 5-round
  buffer) with each `buffer.sampling` (uniform, residual, variance, recency; alpha 0.6, correction 0.4,
  half-life 5 rounds, the defaults), seeds VARIANT_SEEDS, validation, as parity.

grid (sections 2 and 3): a staged search, written down before any of its results were seen, the same
  stages for every method; score = mean greedy validation accuracy over the evaluations of rounds 1..24.
  A. lr in {3e-5, 5e-5, 1e-4, 3e-4} x the reuse knob (ReVal K {2, 4, 8}; GRPO and TRL K {1, 2, 4}),
     P x G = 16 x 8, seed 0.
  B. A's winner at P x G in {32 x 4, 64 x 2}.
  C. replay methods only, at B's winner: buffer {5, 10, 20 rounds} x reference reset {never, every 10
     rounds}, then each replay improvement of section 3 (prioritised by |residual|, prioritised by group
     reward variance, age-decayed sampling) on C's best.
  D. the two best settings of each method again on seeds 1 and 2; the winner is the best mean of 3 seeds.
  Each stage's winner is the highest score; ties: fewer updates, then the smaller lr.

main (section 4): each method's stage-D winner (lr, K, P x G and its overrides) on seeds MAIN_SEEDS, the test
  split, 24 rounds x 128 answers, greedy accuracy on 200 test problems after every round: bench.py's main
  study with the grid's winners, written to benchmarks/results/replay/main/ and summarised by bench.py's own
  `report` (the same summary.json keys as benchmarks/results/mul/, the same target rule and ratios).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402
from bench import RESULTS, launch, make_spec  # noqa: E402
from offline_common import study_args  # noqa: E402

OUT = RESULTS / "replay"
ROUNDS, NUM_EVAL, EVAL_EVERY = 24, 100, 2
PARITY_SEEDS = (0, 1)
PARITY_KS = (1, 2, 4)
VARIANT_SEEDS = (0, 1)
SAMPLINGS = ("uniform", "residual", "variance", "recency")
LRS = (3e-5, 5e-5, 1e-4, 3e-4)
KS = {"reval": (2, 4, 8), "grpo": (1, 2, 4), "trl_grpo": (1, 2, 4)}
SHAPES = (4, 2)  # stage B's G (P = 128 / G); stage A's is 8
BUFFER_ROUNDS, RESETS = (5, 10, 20), (0, 10)
MAIN_SEEDS, MAIN_EVAL = (0, 1, 2, 3, 4), 200
PARITY = {"grpo": ("grpo", {}), "grpo_sample": ("grpo", {"loss.grpo_std": "sample", "loss.grpo_eps": 1e-4}),
          "trl_grpo": ("trl_grpo", {})}


def _spec(out: Path, study: str, label: str, method: str, seed: int, lr: float, k: int, overrides: dict,
          rounds: int, num_eval: int, eval_every: int, samples_per_prompt: int = 8):
    return make_spec(out, study, method, seed, lr, k, rounds, "validation", num_eval, "mul",
                     samples_per_prompt=samples_per_prompt, overrides=overrides, label=label, eval_every=eval_every)


def parity_specs(out: Path, quick: bool) -> list:
    rounds, num_eval, every = (2, 20, 1) if quick else (ROUNDS, NUM_EVAL, EVAL_EVERY)
    seeds, ks = ((0,), (1,)) if quick else (PARITY_SEEDS, PARITY_KS)
    return [_spec(out, "parity", label, method, seed, 1e-4, k, overrides, rounds, num_eval, every)
            for seed in seeds for k in ks for label, (method, overrides) in PARITY.items()]


def variant_specs(out: Path, quick: bool) -> list:
    rounds, num_eval, every = (2, 20, 1) if quick else (ROUNDS, NUM_EVAL, EVAL_EVERY)
    seeds = (0,) if quick else VARIANT_SEEDS
    return [_spec(out, "variants", f"reval_{s}", "reval", seed, 1e-4, 8, {"buffer.sampling": s},
                  rounds, num_eval, every) for seed in seeds for s in SAMPLINGS]


def _best(results: list[tuple[dict, dict]]) -> dict:
    """The setting (spec fields + overrides) with the highest score; ties: fewer updates, then smaller lr."""
    return max(results, key=lambda sr: (sr[1], -sr[0]["k"], -sr[0]["lr"]))[0]


def _label(method: str, G: int, overrides: dict) -> str:
    """reval_G8_capacity1280_ref_reset_every10: the method, the round's shape and every override."""
    return "_".join([method, f"G{G}", *(f"{k.split('.')[-1]}{v}" for k, v in sorted(overrides.items()))])


def grid(out: Path, workers: int, fresh: bool, quick: bool) -> dict:
    """Stages A-D (module docstring); returns each stage's winners."""
    rounds, num_eval, every = (2, 20, 1) if quick else (ROUNDS, NUM_EVAL, EVAL_EVERY)
    lrs = LRS[2:3] if quick else LRS
    stages: dict = {}

    def run(study, rows):  # rows: (label, method, seed, lr, k, overrides, G); the run's name says all of it
        specs = [_spec(out, study, _label(lab, g, ov), m, seed, lr, k, ov, rounds, num_eval, every,
                       samples_per_prompt=g) for lab, m, seed, lr, k, ov, g in rows]
        results = launch(specs, workers, fresh)
        return [({"method": sp.method, "lr": sp.lr, "k": sp.k, "G": sp.samples_per_prompt,
                  "overrides": sp.overrides, "seed": sp.seed}, score(r)) for sp, r in zip(specs, results)]

    base = {m: [] for m in KS}
    for m, ks in KS.items():  # A
        base[m] = run("gridA", [(m, m, 0, lr, k, {}, 8) for lr in lrs for k in (ks[:1] if quick else ks)])
    stages["A"] = {m: _best(r) for m, r in base.items()}
    for m, win in stages["A"].items():  # B
        base[m] += run("gridB", [(m, m, 0, win["lr"], win["k"], {}, g) for g in SHAPES])
    stages["B"] = {m: _best(r) for m, r in base.items()}
    win = stages["B"]["reval"]  # C: the replay method only
    per_round = 128
    rows = [("reval", "reval", 0, win["lr"], win["k"], {"buffer.capacity": b * per_round, "loss.ref_reset_every": r},
             win["G"]) for b in BUFFER_ROUNDS for r in RESETS if (b, r) != (5, 0)]
    base["reval"] += run("gridC", rows)
    best_c = _best(base["reval"])
    base["reval"] += run("gridC", [("reval", "reval", 0, best_c["lr"], best_c["k"],
                                    {**best_c["overrides"], "buffer.sampling": s}, best_c["G"])
                                   for s in SAMPLINGS[1:]])
    stages["C"] = {"reval": _best(base["reval"])}
    final = {}
    for m, results in base.items():  # D: the top two settings again on seeds 1 and 2
        top = sorted(results, key=lambda sr: (sr[1], -sr[0]["k"], -sr[0]["lr"]), reverse=True)[:2]
        scored = []
        for setting, s0 in top:
            again = run("gridD", [(m, m, seed, setting["lr"], setting["k"], setting["overrides"], setting["G"])
                                  for seed in ((1,) if quick else (1, 2))])
            scored.append((setting, round(mean([s0] + [x for _, x in again]), 4)))
        final[m] = {**_best(scored), "mean_score_3_seeds": max(x for _, x in scored)}
    stages["D"] = final
    (out / "grid.json").write_text(json.dumps({"split": "validation", "stages": stages}, indent=2) + "\n")
    return stages


def main_study(out: Path, workers: int, fresh: bool, quick: bool) -> dict:
    """Section 4: the grid's stage-D winners on the test split (module docstring); returns the summary."""
    grid_file = out / "grid.json"
    if not grid_file.exists():
        raise SystemExit(f"{grid_file} is missing: run `python benchmarks/replay_study.py grid` first "
                         "(the main study runs the grid's winners)")
    winners = json.loads(grid_file.read_text())["stages"]["D"]
    main_out = out / "main"
    main_out.mkdir(parents=True, exist_ok=True)
    rounds, num_eval, seeds = (2, 8, (0,)) if quick else (ROUNDS, MAIN_EVAL, MAIN_SEEDS)
    specs = [make_spec(main_out, "main", m, seed, w["lr"], w["k"], rounds, "test", num_eval, "mul",
                       samples_per_prompt=w["G"], overrides=w["overrides"])
             for seed in seeds for m, w in winners.items()]
    # bench.report reads the winners from tuning.json, as after `bench.py tune`
    tuning = {"tuned_on": "validation", "task": "mul", "rounds": ROUNDS, "seed": "0 (stages A-C), 0-2 (D)",
              "rule": "benchmarks/replay_study.py grid, stages A-D", "source": str(grid_file),
              "winner": {m: {"lr": w["lr"], "k": w["k"], "algo": bench.algo_of(m, w["k"]), "G": w["G"],
                             "overrides": w["overrides"]} for m, w in winners.items()}}
    (main_out / "tuning.json").write_text(json.dumps(tuning, indent=2) + "\n")
    launch(specs, workers, fresh)
    return bench.report(main_out)


def score(result: dict) -> float:
    """Mean greedy validation accuracy over the evaluations after rounds 1..R."""
    return round(mean(p["accuracy"] for p in result["curve"][1:]), 4)


def _load(out: Path, study: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "raw").glob(f"{study}__*.json"))]


def parity_summary(out: Path) -> dict:
    rows: dict[str, dict[str, dict]] = {}
    for r in _load(out, "parity"):
        s = r["spec"]
        cell = rows.setdefault(f"K{s['k']}", {}).setdefault(s["label"], {"seeds": [], "mean_accuracy": [],
                                                                         "final_accuracy": [], "train_seconds": []})
        cell["seeds"].append(s["seed"])
        cell["mean_accuracy"].append(score(r))
        cell["final_accuracy"].append(r["curve"][-1]["accuracy"])
        cell["train_seconds"].append(round(r["curve"][-1]["seconds"], 1))
    for cells in rows.values():  # each of ours minus TRL on the same seeds
        trl = cells.get("trl_grpo")
        for label, cell in cells.items():
            if trl and label != "trl_grpo" and cell["seeds"] == trl["seeds"]:
                cell["minus_trl_mean_accuracy"] = [round(a - b, 4) for a, b in
                                                   zip(cell["mean_accuracy"], trl["mean_accuracy"])]
    return {"split": "validation", "lr": 1e-4, "rounds": ROUNDS, "answers_per_round": 128,
            "score": "mean greedy accuracy over the evaluations of rounds 1..R (100 problems, every 2 rounds)",
            "by_k": dict(sorted(rows.items()))}


def variants_summary(out: Path) -> dict:
    rows: dict[str, dict] = {}
    for r in _load(out, "variants"):
        cell = rows.setdefault(r["spec"]["label"], {"seeds": [], "mean_accuracy": [], "final_accuracy": []})
        cell["seeds"].append(r["spec"]["seed"])
        cell["mean_accuracy"].append(score(r))
        cell["final_accuracy"].append(r["curve"][-1]["accuracy"])
    for cell in rows.values():
        cell["mean_over_seeds"] = round(mean(cell["mean_accuracy"]), 4)
    return {"split": "validation", "setting": "reval lr 1e-4, K 8, 16 x 8, 5-round buffer", "by_sampling": rows}


def grid_summary(out: Path) -> dict:
    """Every grid run's score by stage, method and setting (the raw files; the stages need not be done)."""
    stages: dict = {}
    for st in "ABCD":
        for r in _load(out, f"grid{st}"):
            s = r["spec"]
            over = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sorted(s["overrides"].items()))
            setting = f"lr {s['lr']:g}, K {s['k']}, {s['prompts_per_round']} x {s['samples_per_prompt']}" + (
                f", {over}" if over else "")
            cell = stages.setdefault(st, {}).setdefault(s["method"], {}).setdefault(
                setting, {"seeds": [], "score": [], "final_accuracy": [], "cpu_seconds": []})
            cell["seeds"].append(s["seed"])
            cell["score"].append(score(r))
            cell["final_accuracy"].append(r["curve"][-1]["accuracy"])
            cell["cpu_seconds"].append(round(r.get("cpu_seconds", 0.0)))
    return stages


def markdown(summary: dict) -> str:
    lines = ["# Replay study (validation)", ""]
    fmt = lambda xs: " / ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    parity = summary.get("parity")
    if parity:
        lines += ["## Our GRPO vs TRL's (section 1)", "",
                  f"lr {parity['lr']:g}, {parity['rounds']} rounds x {parity['answers_per_round']} answers; "
                  f"{parity['score']}; per seed.", "",
                  "| K | variant | mean accuracy | final accuracy | minus TRL (mean) | train s |", "|---|---|---|---|---|---|"]
        for k, cells in parity["by_k"].items():
            for label, c in cells.items():
                lines.append(f"| {k[1:]} | {label} | {fmt(c['mean_accuracy'])} | {fmt(c['final_accuracy'])} | "
                             f"{fmt(c.get('minus_trl_mean_accuracy', [])) or '-'} | "
                             f"{' / '.join(f'{x:.0f}' for x in c['train_seconds'])} |")
        lines.append("")
    variants = summary.get("variants")
    if variants:
        lines += ["## Replay sampling (section 3)", "", f"{variants['setting']}; per seed.", "",
                  "| sampling | mean accuracy | final accuracy | mean over seeds |", "|---|---|---|---|"]
        for label, c in variants["by_sampling"].items():
            lines.append(f"| {label} | {fmt(c['mean_accuracy'])} | {fmt(c['final_accuracy'])} | "
                         f"{c['mean_over_seeds']:.3f} |")
        lines.append("")
    runs = summary.get("grid_runs")
    if runs:
        lines += ["## The staged grid (sections 2 and 3)", "",
                  "Score: mean greedy validation accuracy over rounds 1-24 (100 problems, every 2 rounds); "
                  "per seed (D: seeds 1 and 2 of a setting A-C ran on seed 0).", ""]
        for st, methods in runs.items():
            lines += [f"### Stage {st}", "", "| method | setting | score | final accuracy | CPU s |",
                      "|---|---|---|---|---|"]
            for m, cells in methods.items():
                for setting, c in sorted(cells.items(), key=lambda kv: -mean(kv[1]["score"])):
                    lines.append(f"| {m} | {setting} | {fmt(c['score'])} | {fmt(c['final_accuracy'])} | "
                                 f"{' / '.join(str(x) for x in c['cpu_seconds'])} |")
            lines.append("")
        winners = summary.get("grid", {}).get("stages", {})
        if winners:
            lines += ["### Winners", "", "| stage | method | lr | K | G | overrides | 3-seed mean |",
                      "|---|---|---|---|---|---|---|"]
            for st, ws in winners.items():
                for m, w in ws.items():
                    lines.append(f"| {st} | {m} | {w['lr']:g} | {w['k']} | {w['G']} | "
                                 f"{json.dumps(w['overrides']) if w['overrides'] else '-'} | "
                                 f"{w.get('mean_score_3_seeds', '')} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def report(out: Path) -> dict:
    summary = {}
    if _load(out, "parity"):
        summary["parity"] = parity_summary(out)
    if _load(out, "variants"):
        summary["variants"] = variants_summary(out)
    if _load(out, "gridA"):
        summary["grid_runs"] = grid_summary(out)
    if (out / "grid.json").exists():
        summary["grid"] = json.loads((out / "grid.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


def main() -> None:
    a, out, _ = study_args(__doc__, "replay", OUT, ("parity", "variants", "grid", "main", "report"))
    if a.stage == "parity":
        launch(parity_specs(out, a.quick), a.workers, a.fresh)
    if a.stage == "variants":
        launch(variant_specs(out, a.quick), a.workers, a.fresh)
    if a.stage == "grid":
        grid(out, a.workers, a.fresh, a.quick)
    if a.stage == "main":
        main_study(out, a.workers, a.fresh, a.quick)
    report(out)


if __name__ == "__main__":
    main()
