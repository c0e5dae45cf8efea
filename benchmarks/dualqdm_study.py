"""Study: does Dual Q-DM imitate beyond its demonstrations better than IQ-Learn and MLE, on `mul`?

    python benchmarks/dualqdm_study.py all            # every stage -> benchmarks/results/dualqdm/
    python benchmarks/dualqdm_study.py all --quick    # smoke-test size, runs/dualqdm-quick (~5 min)
    python benchmarks/dualqdm_study.py report         # summary.json / summary.md again from the results

The claim under test (arXiv 2603.22713): IQ-Learn reduces to behaviour cloning and suppresses the
Q-values of every action at states the demonstrations do not cover; Dual Q-DM's Bellman
constraints let high Q-values reach such states, so it imitates beyond the demonstrations:
Dual Q-DM > IQ-Learn ~ MLE on uncovered states.

  Uncovered states. Four single-digit facts, UNCOVERED (two the warm start slips on, 7*8 and 4*6,
  two it knows, 5*6 and 3*4), appear in no demonstration: the demonstrations are the correct
  worked solutions of NUM_DEMOS training problems whose solutions use none of them. A test problem
  is "uncovered" when its solution uses one of them (a state no demonstration visits), else "covered".
  The pre-trained model is the shipped `mul` warm start (it learnt every fact, some wrongly).
  Budget. Every method gets ROUNDS rounds of DEMOS_PER_ROUND prompts drawn from the same
  NUM_DEMOS problems. MLE and IQ-Learn (lambda 0.01, the library default) see their demonstrations;
  Dual Q-DM sees them plus G = SAMPLES answers it samples to each prompt (rho 0.5, the default);
  ReVal sees no demonstration, only G = SAMPLES sampled answers per prompt scored by the
  verifier (the benchmark's tuned K = 8, beta 0.05), the reference point that uses rewards.
  Tuning. Each method's learning rate is chosen on the validation split (LRS, seed 0, greedy
  accuracy on 200 problems), and with it Dual Q-DM's box [-b, b] (b in BOXES); the winners run
  SEEDS on the test split.
  Measures (test). Greedy accuracy on 400 problems, on the covered and the uncovered ones; the
  compounding-error curve (share of all greedy answers whose first k steps are right); distinct
  whole solutions per 8 samples (100 problems); and the model's values at the states right after
  "x*d=" of the correct solution, for covered and uncovered facts: V(s) = logsumexp of the logits,
  the logit of the right first digit, and its probability.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).parent))
from offline_common import child_main, generations, launch, load, mean_sd, study_args, train_run  # noqa: E402

from reval.model import default_model_path  # noqa: E402
from reval.tasks import TASKS, multiply  # noqa: E402
from reval.tasks.arithmetic import verify  # noqa: E402

OUT = Path("benchmarks/results/dualqdm")
UNCOVERED = ((7, 8), (4, 6), (5, 6), (3, 4))
METHODS = ("mle", "iq", "dualqdm", "reval")
LRS = (3e-5, 1e-4, 3e-4, 1e-3)
BOXES = (2.0, 5.0, 10.0)  # Dual Q-DM's box [-b, b], chosen on validation with its lr (the authors' range: 0.5 to 10)
ROUNDS, DEMOS_PER_ROUND, NUM_DEMOS, SAMPLES = 16, 16, 128, 4
SEEDS = (0, 1, 2)
N_VAL, N_TEST, N_DIVERSE = 200, 400, 100
MAX_NEW = TASKS["mul"].max_new_tokens


def facts(a: int, b: int) -> set[tuple[int, int]]:
    """The unordered digit pairs a correct worked solution of a * b multiplies."""
    return {tuple(sorted((x, d))) for x in map(int, str(a)) for d in map(int, str(b))}


def covered(p) -> bool:
    return not facts(p.a, p.b) & set(UNCOVERED)


def demo_problems(quick: bool) -> list:
    pool = [p for p in TASKS["mul"].split("train", 20_000, seed=0) if covered(p)]
    return random.Random(1).sample(pool, 64 if quick else NUM_DEMOS)


def demos(work: Path, quick: bool) -> Path:
    path = work / "demos.jsonl"
    if not path.exists():
        path.write_text("".join(json.dumps({"prompt": p.question, "response": multiply.solution(p.a, p.b)}) + "\n"
                                for p in demo_problems(quick)))
    return path


def eval_problems(split: str, quick: bool) -> list:
    n = 40 if quick else (N_VAL if split == "validation" else N_TEST)
    return TASKS["mul"].split(split, n, seed=1000)


# -- measures --------------------------------------------------------------------------------

def steps_right(completion: str, a: int, b: int) -> int:
    """How many leading steps of the completion match the correct worked solution."""
    n = 0
    for got, want in zip(completion.split("|"), multiply.solution(a, b).split("|")):
        if got != want:
            break
        n += 1
    return n


def fact_states(model, tok, problems) -> dict:
    """At the state right after "x*d=" / "x*d+c=" of each correct solution, for covered and
    uncovered facts: V(s) = logsumexp of the logits, the logit of the right first digit, and the
    probability of the whole right product (its digits, teacher-forced)."""
    import torch

    from reval.model import format_prompt

    acc = {k: {"v": [], "logit": [], "prob": []} for k in ("covered", "uncovered")}
    with torch.no_grad():
        for p in problems:
            prompt = format_prompt(tok, p.question)
            sol = multiply.solution(p.a, p.b)
            ids = tok(prompt + sol, add_special_tokens=False)["input_ids"]
            n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
            logits = model(torch.tensor([ids])).logits[0].float()  # (L, V): position i predicts token i + 1
            logp, lse = torch.log_softmax(logits, -1), torch.logsumexp(logits, -1)
            pos = 0
            for step in sol.split("|"):
                m = multiply._MUL_STEP.match(step)
                if m:  # char tokenizer: one token per character
                    first = n_prompt + pos + step.index("=") + 1  # token index of the product's first digit
                    digits = range(first, n_prompt + pos + len(step))
                    kind = "uncovered" if tuple(sorted((int(m.group(1)), int(m.group(2))))) in UNCOVERED \
                        else "covered"
                    acc[kind]["v"].append(lse[first - 1].item())
                    acc[kind]["logit"].append(logits[first - 1, ids[first]].item())
                    acc[kind]["prob"].append(math.exp(sum(logp[i - 1, ids[i]].item() for i in digits)))
                pos += len(step) + 1
    return {k: {m: mean(v) if v else float("nan") for m, v in d.items()} | {"states": len(d["v"])}
            for k, d in acc.items()}


def measure(model_dir, split: str, seed: int, quick: bool) -> dict:
    evals = eval_problems(split, quick)
    greedy = [g[0] for g in generations(model_dir, [p.question for p in evals], max_new_tokens=MAX_NEW)]
    right = [verify(t, p.answer) for t, p in zip(greedy, evals)]
    cov = [covered(p) for p in evals]
    res = {"accuracy": float(mean(right)),
           "accuracy_covered": float(mean(r for r, c in zip(right, cov) if c)),
           "accuracy_uncovered": float(mean(r for r, c in zip(right, cov) if not c)),
           "n_covered": sum(cov), "n_uncovered": len(cov) - sum(cov)}
    if split == "test":
        n_steps = [len(multiply.solution(p.a, p.b).split("|")) for p in evals]
        ok = [steps_right(t, p.a, p.b) for t, p in zip(greedy, evals)]
        res["steps_curve"] = [float(mean(k >= s for k in ok)) for s in range(1, max(n_steps) + 1)]
        res["steps_curve_uncovered"] = [float(mean(k >= s for k, c in zip(ok, cov) if not c))
                                        for s in range(1, max(n_steps) + 1)]
        k_evals = evals[: 10 if quick else N_DIVERSE]
        groups = generations(model_dir, [p.question for p in k_evals], samples=8, max_new_tokens=MAX_NEW, seed=seed)
        res["distinct_solutions"] = float(mean(len(set(g)) for g in groups))
        res["sampled_accuracy"] = float(mean(mean(verify(t, p.answer) for t in g) for g, p in zip(groups, k_evals)))
        model, tok = load(model_dir)
        states = fact_states(model, tok, evals[: 20 if quick else 200])
        res["q_states"] = states
        res["greedy_examples"] = [{"question": p.question, "completion": t, "covered": c}
                                  for p, t, c in list(zip(evals, greedy, cov))[:4]]
    return res


# -- runs -------------------------------------------------------------------------------------

def job(out: Path, work: Path, stage: str, method: str, lr: float, seed: int, quick: bool,
        box: float | None = None) -> dict:
    name = f"{stage}/{method}-lr{lr:g}" + (f"-box{box:g}" if box is not None else "") + f"-s{seed}"
    return {"name": name, "result": str(out / "raw" / f"{name}.json"), "run_dir": str(work / "runs" / name),
            "work": str(work), "method": method, "lr": lr, "seed": seed, "quick": quick, "box": box,
            "split": "validation" if stage == "tune" else "test"}


def setting(j: dict) -> str:
    """A tuning grid's key: the learning rate (and Dual Q-DM's box)."""
    return f"{j['lr']:g}" + (f", box {j['box']:g}" if j.get("box") is not None else "")


def run_job(j: dict) -> dict:
    quick, method = j["quick"], j["method"]
    rounds = 3 if quick else ROUNDS
    common = {"model.path": str(default_model_path("mul")), "rounds": rounds,
              "rollout.prompts_per_round": DEMOS_PER_ROUND, "rollout.max_new_tokens": MAX_NEW,
              "optim.lr": j["lr"], "seed": j["seed"], "eval.every": 0}
    if method == "reval":  # the same prompts, a verifier's reward instead of demonstrations
        problems = demo_problems(quick)
        config = {**common, "algo": "reval", "task.name": "mul", "rollout.samples_per_prompt": SAMPLES,
                  "buffer.updates_per_round": 8, "loss.beta": 0.05, "buffer.capacity": 640}
        final = train_run(config, Path(j["run_dir"]), problems=problems, eval_problems=[])
    else:
        config = {**common, "algo": method, "task.data": str(Path(j["work"]) / "demos.jsonl")}
        if method == "dualqdm":
            config.update({"rollout.samples_per_prompt": SAMPLES, "loss.dualqdm_r_min": -j["box"],
                           "loss.dualqdm_r_max": j["box"]})
        final = train_run(config, Path(j["run_dir"]))
    res = measure(final, j["split"], j["seed"], quick)
    rounds_ = [r for r in map(json.loads, (Path(j["run_dir"]) / "metrics.jsonl").read_text().splitlines())
               if "loss/total" in r]
    res["train_seconds"] = rounds_[-1]["seconds"]
    res["train_metrics"] = {k: [r.get(k) for r in rounds_] for k in rounds_[-1]
                            if k.startswith(("loss/", "q/", "rollout/reward_mean"))}  # per round
    shutil.rmtree(j["run_dir"])
    return res


def base_scores(out: Path, quick: bool) -> dict:
    path = out / "raw" / "base.json"
    if not path.exists():
        res = measure(default_model_path("mul"), "test", 0, quick)
        res["validation"] = measure(default_model_path("mul"), "validation", 0, quick)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
    return json.loads(path.read_text())


def tune(out: Path, work: Path, workers: int, fresh: bool, quick: bool) -> dict:
    lrs = LRS[:2] if quick else LRS
    # the slow methods first, so the two workers finish together
    jobs = [job(out, work, "tune", m, lr, 0, quick, box) for m in ("reval", "dualqdm", "iq", "mle") for lr in lrs
            for box in (BOXES if m == "dualqdm" else (None,))]
    results = launch(__file__, jobs, workers, fresh)
    grid = {m: {setting(r["job"]): r["accuracy"] for r in results if r["job"]["method"] == m} for m in METHODS}
    best = {m: max((r for r in results if r["job"]["method"] == m), key=lambda r: r["accuracy"])["job"]
            for m in METHODS}
    tuning = {"grid": grid, "best_lr": {m: b["lr"] for m, b in best.items()},
              "best_box": {m: b["box"] for m, b in best.items() if b["box"] is not None},
              "grid_uncovered": {m: {setting(r["job"]): r["accuracy_uncovered"] for r in results
                                     if r["job"]["method"] == m} for m in METHODS}}
    (out / "tuning.json").write_text(json.dumps(tuning, indent=1) + "\n")
    return tuning


def binding_box(tuning: dict) -> tuple[float, float]:
    """(box, lr) of the ablation: the narrowest box, at its best learning rate on validation."""
    box = min(BOXES)
    grid = {k: a for k, a in tuning["grid"]["dualqdm"].items() if k.endswith(f"box {box:g}")}
    return box, float(max(grid, key=grid.get).split(",")[0])


def run(out: Path, work: Path, tuning: dict, workers: int, fresh: bool, quick: bool) -> None:
    jobs = [job(out, work, "run", m, tuning["best_lr"][m], s, quick, tuning["best_box"].get(m))
            for m in ("reval", "dualqdm", "iq", "mle") for s in SEEDS]
    # the ablation: Dual Q-DM with a box that binds (validation picks the widest, where it barely does)
    box, lr = binding_box(tuning)
    jobs += [job(out, work, "ablation", "dualqdm", lr, s, quick, box) for s in SEEDS]
    launch(__file__, jobs, workers, fresh)


KEYS = ("accuracy", "accuracy_covered", "accuracy_uncovered", "sampled_accuracy", "distinct_solutions",
        "train_seconds")


def report(out: Path) -> dict:
    tuning = json.loads((out / "tuning.json").read_text())
    base = json.loads((out / "raw" / "base.json").read_text())
    summary = {"setup": {"uncovered_facts": [f"{a}*{b}" for a, b in UNCOVERED], "rounds": ROUNDS,
                         "prompts_per_round": DEMOS_PER_ROUND, "demonstrations": NUM_DEMOS,
                         "samples_per_prompt": SAMPLES, "seeds": list(SEEDS), "test_problems": N_TEST},
               "base": base, "tuning": tuning, "methods": {}}
    box, lr = binding_box(tuning)
    variants = {m: ("run", m, tuning["best_lr"][m], tuning["best_box"].get(m)) for m in METHODS}
    variants[f"dualqdm, box {box:g} (ablation)"] = ("ablation", "dualqdm", lr, box)
    for m, (stage, method, lr_, box_) in variants.items():
        names = [job(out, out, stage, method, lr_, seed, False, box_)["result"] for seed in SEEDS]
        runs = [json.loads(Path(p).read_text()) for p in names if Path(p).exists()]
        if not runs:
            continue
        s = {"lr": lr_, "box": box_,
             **{k: mean_sd([r[k] for r in runs]) for k in KEYS}}
        s["steps_curve_per_seed"] = [r["steps_curve"] for r in runs]
        s["steps_curve"] = [mean(c) for c in zip(*(r["steps_curve"] for r in runs))]
        s["steps_curve_uncovered"] = [mean(c) for c in zip(*(r["steps_curve_uncovered"] for r in runs))]
        s["q_states"] = {kind: {q: mean_sd([r["q_states"][kind][q] for r in runs]) for q in ("v", "logit", "prob")}
                         for kind in ("covered", "uncovered")}
        s["n_covered"], s["n_uncovered"] = runs[0]["n_covered"], runs[0]["n_uncovered"]
        if all("train_metrics" in r for r in runs):  # the last round's training metrics, mean over seeds
            s["last_round"] = {k: mean(r["train_metrics"][k][-1] for r in runs) for k in runs[0]["train_metrics"]}
        summary["methods"][m] = s
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    vals = lambda d: ", ".join(f"{100 * v:.0f}" for v in d["values"])  # noqa: E731
    lines = ["| method (lr) | greedy acc | covered | uncovered | sampled acc | distinct solutions / 8 | train s |",
             "|---|---|---|---|---|---|---|",
             f"| warm start | {pct(base['accuracy'])} | {pct(base['accuracy_covered'])} | "
             f"{pct(base['accuracy_uncovered'])} | {pct(base['sampled_accuracy'])} | "
             f"{base['distinct_solutions']:.2f} | - |"]
    for m, s in summary["methods"].items():
        knobs = f"{s['lr']:g}" + (f", box +-{s['box']:g}" if s["box"] is not None else "")
        lines.append(f"| {m} ({knobs}) | {pct(s['accuracy']['mean'])} ({vals(s['accuracy'])}) | "
                     f"{pct(s['accuracy_covered']['mean'])} ({vals(s['accuracy_covered'])}) | "
                     f"{pct(s['accuracy_uncovered']['mean'])} ({vals(s['accuracy_uncovered'])}) | "
                     f"{pct(s['sampled_accuracy']['mean'])} | {s['distinct_solutions']['mean']:.2f} | "
                     f"{s['train_seconds']['mean']:.0f} |")
    first = next(iter(summary["methods"].values()), None)
    if first:
        lines += ["", f"Test problems: {first['n_covered']} covered, {first['n_uncovered']} uncovered.", "",
                  "Compounding errors: share of all greedy test answers whose first k steps are right (a correct answer "
                  "has 10 steps, or 11: only those reach k = 11):",
                  "", "| method | " + " | ".join(f"k={k}" for k in range(1, len(base["steps_curve"]) + 1)) + " |",
                  "|---|" + "---|" * len(base["steps_curve"]),
                  "| warm start | " + " | ".join(f"{100 * x:.0f}" for x in base["steps_curve"]) + " |"]
        for m, s in summary["methods"].items():
            lines.append(f"| {m} | " + " | ".join(f"{100 * x:.0f}" for x in s["steps_curve"]) + " |")
        lines += ["", "Values at the state right after \"x*d=\" of the correct solution (mean over states and seeds): "
                      "V = logsumexp of the logits, the right digit's logit and probability:", "",
                  "| method | V covered | V uncovered | logit covered | logit uncovered | p covered | p uncovered |",
                  "|---|---|---|---|---|---|---|",
                  "| warm start | " + " | ".join(f"{base['q_states'][k][q]:.2f}" if q != "prob" else
                                                  f"{base['q_states'][k][q]:.3f}"
                                                  for q in ("v", "logit", "prob") for k in ("covered", "uncovered"))
                  + " |"]
        for m, s in summary["methods"].items():
            lines.append(f"| {m} | " + " | ".join(f"{s['q_states'][k][q]['mean']:.2f}" if q != "prob" else
                                                  f"{s['q_states'][k][q]['mean']:.3f}"
                                                  for q in ("v", "logit", "prob") for k in ("covered", "uncovered"))
                         + " |")
    dq = {m: s for m, s in summary["methods"].items() if m.startswith("dualqdm") and "last_round" in s}
    if dq:
        lines += ["", "Dual Q-DM's constraint in the last training round (mean over seeds): share of implied rewards "
                      "outside the box, penalty per boxed token, mean implied reward:", "",
                  "| variant | outside, demonstrations | outside, samples | penalty | r demonstrations | r samples |",
                  "|---|---|---|---|---|---|"]
        for m, s in dq.items():
            t = s["last_round"]
            lines.append(f"| {m} | {100 * t['q/outside_box_expert']:.1f}% | {100 * t['q/outside_box_policy']:.1f}% | "
                         f"{t['loss/bellman']:.3f} | {t['q/reward_expert']:.2f} | {t['q/reward_policy']:.2f} |")
    lines += ["", "Validation greedy accuracy (seed 0) by learning rate: " + "; ".join(
        f"{m}: " + ", ".join(f"{k} {100 * a:.1f}%" for k, a in g.items()) for m, g in tuning["grid"].items())]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        return child_main(run_job)
    a, out, work = study_args(__doc__, "dualqdm", OUT)
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
