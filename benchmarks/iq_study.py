"""Study: IQ-Learn (MLE + a TD term) vs MLE as the supervised stage before RL, on `mul`.

    python benchmarks/iq_study.py all            # every stage -> benchmarks/results/iq/
    python benchmarks/iq_study.py all --quick    # smoke-test size, runs/iq-quick (~3 min)
    python benchmarks/iq_study.py report         # summary.json / summary.md again from the results

The paper (arXiv 2409.01369) fine-tunes pre-trained models on task demonstrations and finds
IQ-Learn's TD term gives more diverse generations at equal or better task scores. Here:

  sft    The pre-trained model is the shipped `mul` warm start (31% greedy on validation: it
         learnt habits, right and wrong, from flawed worked solutions). Demonstrations: the
         correct worked solutions of 128 training problems (a JSONL of prompt / response,
         through the user-data path). Each method gets the same demonstrations and budget:
         ROUNDS = 16 rounds of 16 demonstrations (2 epochs), one update each. Methods: MLE (lambda = 0) and
         IQ at lambda in LAMBDAS. Each method's learning rate is chosen on the validation
         split (100 problems, greedy accuracy, seed 0, lr in LRS); the winners then run
         seeds 0-2 and are measured on the test split: greedy accuracy (200 problems),
         sampled accuracy and diversity over 8 samples for each of 100 test problems
         (distinct final answers and distinct whole solutions per group of 8).
  rl     ReVal from each method's seed-0 warm start, at the benchmark's validation-tuned
         setting (K = 8, lr 1e-4, beta 0.05, 16 x 8 answers per round), RL_ROUNDS rounds,
         greedy test accuracy every 2 rounds: how many answers to reach the target.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).parent))
from offline_common import child_main, generations, launch, mean_sd, study_args, train_run  # noqa: E402

from reval.metrics import read_metrics  # noqa: E402
from reval.model import default_model_path  # noqa: E402
from reval.tasks import TASKS, multiply  # noqa: E402
from reval.tasks.arithmetic import extract_answer, verify  # noqa: E402

OUT = Path("benchmarks/results/iq")
LAMBDAS = (0.001, 0.01, 0.1)
LRS = (1e-4, 3e-4, 1e-3)
ROUNDS, DEMOS_PER_ROUND, NUM_DEMOS = 16, 16, 128
SEEDS = (0, 1, 2)
RL_ROUNDS = 12
MAX_NEW = TASKS["mul"].max_new_tokens


def methods(quick: bool) -> dict[str, float]:
    """name -> lambda (0 = MLE)."""
    lams = LAMBDAS[1:2] if quick else LAMBDAS
    return {"mle": 0.0, **{f"iq{lam:g}": lam for lam in lams}}


def demos(work: Path, quick: bool) -> Path:
    path = work / "demos.jsonl"
    if not path.exists():
        train = random.Random(1).sample(TASKS["mul"].split("train", 20_000, seed=0), 64 if quick else NUM_DEMOS)
        path.write_text("".join(json.dumps({"prompt": p.question, "response": multiply.solution(p.a, p.b)}) + "\n"
                                for p in train))
    return path


def sft_job(out: Path, work: Path, stage: str, method: str, lam: float, lr: float, seed: int, quick: bool) -> dict:
    name = f"{stage}/{method}-lr{lr:g}-s{seed}"
    return {"kind": "sft", "name": name, "result": str(out / "raw" / f"{name}.json"),
            "run_dir": str(work / "runs" / name), "work": str(work), "method": method, "lambda": lam, "lr": lr,
            "seed": seed, "quick": quick, "split": "validation" if stage == "tune" else "test",
            "keep_model": str(work / "models" / method) if stage == "run" and seed == 0 else None}


def rl_job(out: Path, work: Path, method: str, seed: int, quick: bool) -> dict:
    name = f"rl/{method}-s{seed}"
    return {"kind": "rl", "name": name, "result": str(out / "raw" / f"{name}.json"),
            "run_dir": str(work / "runs" / name), "model": str(work / "models" / method), "method": method,
            "seed": seed, "quick": quick}


def diversity(groups: list[list[str]], answers: list[str]) -> dict:
    return {"sampled_accuracy": mean(mean(verify(t, a) for t in g) for g, a in zip(groups, answers)),
            "distinct_answers": mean(len({extract_answer(t) for t in g}) for g in groups),
            "distinct_solutions": mean(len(set(g)) for g in groups)}


def run_job(j: dict) -> dict:
    quick = j["quick"]
    if j["kind"] == "rl":
        run_dir = Path(j["run_dir"])
        train_run({"algo": "reval", "task.name": "mul", "model.path": j["model"], "rounds": 2 if quick else RL_ROUNDS,
                   "optim.lr": 1e-4, "buffer.updates_per_round": 8, "loss.beta": 0.05, "buffer.capacity": 640,
                   "eval.every": 2, "task.eval_split": "test", "task.num_test": 40 if quick else 200,
                   "seed": j["seed"]}, run_dir)
        curve = [{"round": r["round"], "samples": r["samples"], "accuracy": r["eval/accuracy"]}
                 for r in read_metrics(run_dir / "metrics.jsonl") if "eval/accuracy" in r]
        shutil.rmtree(run_dir)
        return {"curve": curve, "final": curve[-1]["accuracy"]}
    config = {"algo": "iq" if j["lambda"] else "mle", "loss.iq_lambda": j["lambda"],
              "task.data": str(Path(j["work"]) / "demos.jsonl"), "model.path": str(default_model_path("mul")),
              "rounds": 4 if quick else ROUNDS, "rollout.prompts_per_round": DEMOS_PER_ROUND,
              "rollout.max_new_tokens": MAX_NEW, "optim.lr": j["lr"], "seed": j["seed"], "eval.every": 0}
    final = train_run(config, Path(j["run_dir"]))
    n = 20 if quick else (100 if j["split"] == "validation" else 200)
    evals = TASKS["mul"].split(j["split"], n, seed=1000)
    greedy = [g[0] for g in generations(final, [p.question for p in evals], max_new_tokens=MAX_NEW)]
    res = {"accuracy": float(mean(verify(t, p.answer) for t, p in zip(greedy, evals)))}
    if j["split"] == "test":
        k_evals = evals[: 10 if quick else 100]
        groups = generations(final, [p.question for p in k_evals], samples=8, max_new_tokens=MAX_NEW, seed=j["seed"])
        res.update({k: float(v) for k, v in diversity(groups, [p.answer for p in k_evals]).items()})
        res["example_group"] = groups[0]
    if j["keep_model"]:
        shutil.rmtree(j["keep_model"], ignore_errors=True)
        shutil.copytree(final, j["keep_model"])
    shutil.rmtree(j["run_dir"])
    return res


def base_scores(out: Path, quick: bool) -> dict:
    path = out / "raw" / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    j = {"kind": "base", "quick": quick}
    n = 20 if quick else 200
    evals = TASKS["mul"].split("test", n, seed=1000)
    model = default_model_path("mul")
    greedy = [g[0] for g in generations(model, [p.question for p in evals], max_new_tokens=MAX_NEW)]
    k_evals = evals[: 10 if quick else 100]
    groups = generations(model, [p.question for p in k_evals], samples=8, max_new_tokens=MAX_NEW, seed=0)
    res = {"accuracy": float(mean(verify(t, p.answer) for t, p in zip(greedy, evals))),
           **{k: float(v) for k, v in diversity(groups, [p.answer for p in k_evals]).items()}, "job": j}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def tune(out: Path, work: Path, workers: int, fresh: bool, quick: bool) -> dict:
    ms = methods(quick)
    jobs = [sft_job(out, work, "tune", m, lam, lr, 0, quick) for m, lam in ms.items()
            for lr in (LRS[:2] if quick else LRS)]
    results = launch(__file__, jobs, workers, fresh)
    grid = {m: {f"{r['job']['lr']:g}": r["accuracy"] for r in results if r["job"]["method"] == m} for m in ms}
    tuning = {"grid": grid, "best_lr": {m: float(max(g, key=g.get)) for m, g in grid.items()}}
    (out / "tuning.json").write_text(json.dumps(tuning, indent=1) + "\n")
    return tuning


def run(out: Path, work: Path, tuning: dict, workers: int, fresh: bool, quick: bool) -> None:
    ms = methods(quick)
    launch(__file__, [sft_job(out, work, "run", m, lam, tuning["best_lr"][m], s, quick)
                      for m, lam in ms.items() for s in SEEDS], workers, fresh)
    launch(__file__, [rl_job(out, work, m, 0, quick) for m in ms], workers, fresh)


def answers_to(curve: list[dict], target: float) -> int | None:
    return next((c["samples"] for c in curve if c["accuracy"] >= target), None)


def report(out: Path) -> dict:
    tuning = json.loads((out / "tuning.json").read_text())
    base = json.loads((out / "raw" / "base.json").read_text())
    summary = {"base": base, "tuning": tuning, "sft": {}, "rl": {}}
    keys = ("accuracy", "sampled_accuracy", "distinct_answers", "distinct_solutions")
    for m in tuning["grid"]:
        runs = [json.loads(p.read_text()) for p in sorted((out / "raw" / "run").glob(f"{m}-lr*.json"))]
        summary["sft"][m] = {"lr": tuning["best_lr"][m], **{k: mean_sd([r[k] for r in runs]) for k in keys}}
        rl = out / "raw" / "rl" / f"{m}-s0.json"
        if rl.exists():
            summary["rl"][m] = json.loads(rl.read_text())
    if summary["rl"]:
        target = 0.95 * max(r["final"] for r in summary["rl"].values())
        summary["rl_target"] = target
        for r in summary["rl"].values():
            r["answers_to_target"] = answers_to(r["curve"], target)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = ["| warm start (lr) | greedy acc | sampled acc | distinct answers / 8 | distinct solutions / 8 |",
             "|---|---|---|---|---|",
             f"| shipped warm start (no SFT) | {pct(base['accuracy'])} | {pct(base['sampled_accuracy'])} | "
             f"{base['distinct_answers']:.2f} | {base['distinct_solutions']:.2f} |"]
    for m, s in summary["sft"].items():
        lines.append(f"| {m} ({s['lr']:g}) | {pct(s['accuracy']['mean'])} ({', '.join(f'{100 * v:.0f}' for v in s['accuracy']['values'])})"
                     f" | {pct(s['sampled_accuracy']['mean'])} | {s['distinct_answers']['mean']:.2f} | "
                     f"{s['distinct_solutions']['mean']:.2f} |")
    if summary["rl"]:
        lines += ["", f"ReVal from each seed-0 warm start (test greedy accuracy; target = 95% of the best final = "
                      f"{pct(summary['rl_target'])}):", "",
                  "| warm start | start | " + " | ".join(f"round {c['round']}" for c in
                                                         next(iter(summary["rl"].values()))["curve"][1:]) +
                  " | answers to target |", "|---|---|" + "---|" * (len(next(iter(summary["rl"].values()))["curve"]))]
        for m, r in summary["rl"].items():
            lines.append(f"| {m} | " + " | ".join(pct(c["accuracy"]) for c in r["curve"]) +
                         f" | {r['answers_to_target'] or 'never'} |")
    lines += ["", "Validation greedy accuracy (seed 0) by learning rate: " + "; ".join(
        f"{m}: " + ", ".join(f"{lr} {100 * a:.0f}%" for lr, a in g.items()) for m, g in tuning["grid"].items())]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        return child_main(run_job)
    a, out, work = study_args(__doc__, "iq", OUT)
    if a.stage != "report":
        demos(work, a.quick)
        base_scores(out, a.quick)
        tuning = tune(out, work, a.workers, a.fresh, a.quick) if a.stage in ("all", "tune") else \
            json.loads((out / "tuning.json").read_text())
        if a.stage in ("all", "run"):
            run(out, work, tuning, a.workers, a.fresh, a.quick)
    if a.stage in ("all", "report", "run"):
        report(out)


if __name__ == "__main__":
    main()
