"""Study: a new preference without forgetting. SFT on the chosen answers vs DPO vs Q-Adapter.

    python benchmarks/preference_study.py all            # every stage -> benchmarks/results/preferences/
    python benchmarks/preference_study.py all --quick    # smoke-test size, runs/preferences-quick (~2 min)
    python benchmarks/preference_study.py report         # summary.json / summary.md again from the results

Stages:
  base    ReVal trains the shipped `add` warm start (which drops carries) until it solves the
          task: 10 rounds of 16 x 8 answers at `add`'s validation-tuned setting (K = 2, lr 3e-4).
          That model is the starting point of every method: what it knows is addition.
  data    The new preference, verifiable and in conflict with nothing it knows: end the answer
          with "Answer: N" instead of "\\boxed{N}" ("a|b|c|Answer: N"; the steps stay). The base
          model answers 512 training problems WITHOUT carries (one sample each, temperature 1);
          each answer becomes a pair: chosen = the same answer in the new layout (its steps,
          right or wrong, unchanged), rejected = the answer as the model wrote it. SFT trains on
          the chosen answers of the same pairs. The held task is addition WITH carries, the
          skill RL taught the model (its warm start drops carries) and which no pair shows.
  tune    Each method's learning rate, on the validation split (greedy), seed 0: lr in LRS,
          the same grid for every method. Score = (share of problems like the pairs' answered
          correctly in the new layout) x (accuracy on the held problems). DPO's beta (0.1, TRL's) and Q-Adapter's
          alpha~, alpha_0 and chi2 weight (1, 0.01, 0.1, the authors') stay at their defaults.
  run     The winners on the test split (greedy), seeds 0-2 (the seed orders the pairs and
          initialises Q-Adapter's head).

Same data and budget for every method: ROUNDS rounds of 16 pairs (SFT: 16 chosen answers),
one optimizer update per round. Metrics of a model, on the held problems (with carries) and
on problems like the pairs' (no carries): `format` (share of answers in the new layout),
`accuracy` (correct answers in any layout: what forgetting lowers), `both` (correct and in
the new layout).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).parent))
from offline_common import child_main, generations, launch, mean_sd, pair_margins, study_args, train_run  # noqa: E402

from reval.tasks import TASKS  # noqa: E402
from reval.tasks.arithmetic import num_carries, verify  # noqa: E402

OUT = Path("benchmarks/results/preferences")
# method -> (algo, LoRA rank): the paper trains every method as a LoRA adapter (rank 8, alpha 16);
# qadapter-head is our residual-Q head on the frozen model (docs/qadapter.md)
METHODS = {"sft": ("mle", 8), "dpo": ("dpo", 8), "qadapter": ("qadapter", 8), "qadapter-head": ("qadapter", 0)}
LRS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
ROUNDS, PAIRS_PER_ROUND, NUM_PAIRS = 96, 16, 512
MIX = 0.1  # share of the base's supervised solutions written in the new layout
SEEDS = (0, 1, 2)
OLD = re.compile(r"(?:[^|\n]+\|)*\\boxed\{([^{}\n]*)\}")
NEW = re.compile(r"(?:[^|\n]+\|)*Answer: ([^\n|]*)")


def new_layout(text: str) -> str | None:
    """The answer rewritten in the new layout, or None if it is not in the old one."""
    m = OLD.fullmatch(text)
    if m is None:
        return None
    return text[: m.start(1) - len("\\boxed{")] + f"Answer: {m.group(1)}"


def correct(text: str, answer: str) -> bool:
    """The arithmetic verifier, which also reads a final "Answer: N" after the steps."""
    m = NEW.fullmatch(text)
    return m.group(1).strip() == answer if m else verify(text, answer)


def either_layout_reward(completions: list[str], answer: list[str], **columns) -> list[float]:
    """The base's RL reward: a correct final answer in either layout (the task's own verifier
    reads only \\boxed{N} here, and would teach the base to drop the new layout)."""
    return [1.0 if correct(c, a) else 0.0 for c, a in zip(completions, answer)]


def scores(texts: list[str], answers: list[str]) -> dict:
    fmt = [NEW.fullmatch(t) is not None for t in texts]
    ok = [correct(t, a) for t, a in zip(texts, answers)]
    return {"format": float(mean(fmt)), "accuracy": float(mean(ok)),
            "both": float(mean(f and o for f, o in zip(fmt, ok))),
            "old_format": float(mean(OLD.fullmatch(t) is not None for t in texts))}


def problems(split: str, n: int, carries: bool):
    """The first n problems of the split with (held task) or without carries."""
    pool = TASKS["add"].split(split, 20 * n, seed=1000)
    return [p for p in pool if (num_carries(p.a, p.b) > 0) == carries][:n]


def score(res: dict) -> float:
    """The tuning criterion: learnt the preference (share of held-out pairs like the training ones
    whose chosen answer the model finds likelier) times kept what it knew (greedy accuracy on the
    held problems)."""
    return res["like_pairs"]["pair_accuracy"] * res["held"]["accuracy"]


def evaluate(model: Path, work: Path, split: str, quick: bool) -> dict:
    """Scores on the held problems (with carries) and on problems like the pairs' (no carries)."""
    n = 20 if quick else (100 if split == "validation" else 200)
    res = {}
    for name, carries in (("held", True), ("like_pairs", False)):
        evals = problems(split, n, carries)
        texts = [t[0] for t in generations(model, [p.question for p in evals])]
        pairs = [json.loads(line) for line in (work / f"pairs-{split}-{name}.jsonl").read_text().splitlines()]
        margins = pair_margins(model, pairs)
        res[name] = {**scores(texts, [p.answer for p in evals]),
                     "pair_accuracy": float(mean(m > 0 for m in margins)), "pair_margin": float(mean(margins)),
                     "examples": texts[:2]}
    return res


# -- stages -------------------------------------------------------------------------------------

def base(work: Path, quick: bool) -> Path:
    """ReVal trains the shipped `add` warm start until it solves the task; then a short supervised
    pass on 4000 of its own answers, MIX of them rewritten in the new layout, teaches it that the
    layout exists (a minority habit, as a style the preference data will ask for)."""
    model = work / "base-model"
    if (model / "config.json").exists():
        return model
    solved = train_run({"algo": "reval", "task.name": "add", "rounds": 2 if quick else 10, "optim.lr": 3e-4,
                        "buffer.updates_per_round": 2, "eval.every": 0, "seed": 0}, work / "runs" / "reval",
                       eval_problems=[])
    probs = TASKS["add"].split("train", 20_000, seed=0)[: 256 if quick else 4000]
    rng = random.Random(0)
    demos = [{"prompt": p.question, "response": new_layout(t) if rng.random() < MIX and new_layout(t) else t}
             for p, (t,) in zip(probs, generations(solved, [p.question for p in probs], samples=1, seed=2))]
    (work / "mix.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    final = train_run({"algo": "mle", "task.data": str(work / "mix.jsonl"), "model.path": str(solved),
                       "rounds": 4 if quick else 100, "rollout.prompts_per_round": 64, "optim.lr": 1e-3,
                       "eval.every": 0, "seed": 0}, work / "runs" / "mix")
    shutil.copytree(final, model)
    shutil.rmtree(work / "runs")
    return model


def pair_rows(model: Path, probs: list, seed: int) -> tuple[list[dict], list[list[str]]]:
    """One sample of the model per problem, as a pair: the sample in the new layout over the sample."""
    texts = generations(model, [p.question for p in probs], samples=1, seed=seed)
    rows = [{"prompt": p.question, "chosen": new_layout(t), "rejected": t} for p, (t,) in zip(probs, texts)
            if new_layout(t) is not None]
    return rows, texts


def data(out: Path, work: Path, model: Path, quick: bool) -> Path:
    pairs_file = work / "pairs.jsonl"
    for split in ("validation", "test"):  # held-out pairs, to measure the preference as a ranking
        for name, carries in (("held", True), ("like_pairs", False)):
            path = work / f"pairs-{split}-{name}.jsonl"
            if not path.exists():
                n = 20 if quick else (100 if split == "validation" else 200)
                rows, _ = pair_rows(model, problems(split, n, carries), seed=1)
                path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if pairs_file.exists():
        return pairs_file
    no_carry = [p for p in TASKS["add"].split("train", 20_000, seed=0) if num_carries(p.a, p.b) == 0]
    train = random.Random(1).sample(no_carry, 64 if quick else NUM_PAIRS)
    rows, texts = pair_rows(model, train, seed=0)
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "sft.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["chosen"]}) + "\n"
                                           for r in rows))
    (out / "data.json").write_text(json.dumps({"answers": len(train), "pairs": len(rows),
                                               "base_sample_correct": mean(verify(t[0], p.answer)
                                                                           for p, t in zip(train, texts))}) + "\n")
    return pairs_file


def job(out: Path, work: Path, stage: str, method: str, lr: float, seed: int, quick: bool) -> dict:
    name = f"{stage}/{method}-lr{lr:g}-s{seed}"
    return {"name": name, "result": str(out / "raw" / f"{name}.json"), "run_dir": str(work / "runs" / name),
            "work": str(work), "method": method, "lr": lr, "seed": seed, "quick": quick,
            "split": "validation" if stage == "tune" else "test"}


def run_job(j: dict) -> dict:
    work = Path(j["work"])
    data_file = work / ("sft.jsonl" if j["method"] == "sft" else "pairs.jsonl")
    algo, rank = METHODS[j["method"]]
    config = {"algo": algo, "model.lora_rank": rank, "model.lora_alpha": 16.0, "task.data": str(data_file), "model.path": str(work / "base-model"),
              "rounds": 4 if j["quick"] else ROUNDS, "rollout.prompts_per_round": PAIRS_PER_ROUND,
              "optim.lr": j["lr"], "seed": j["seed"], "eval.every": 0}
    if j["method"] == "dpo":
        config["loss.beta"] = 0.1  # TRL's default
    final = train_run(config, Path(j["run_dir"]))
    res = evaluate(final, Path(j["work"]), j["split"], j["quick"])
    shutil.rmtree(j["run_dir"])
    return {**res, "score": score(res)}


def evaluate_base(out: Path, work: Path, model: Path, quick: bool) -> dict:
    path = out / "raw" / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    res = {split: evaluate(model, work, split, quick) for split in ("validation", "test")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    return res


def tune(out: Path, work: Path, workers: int, fresh: bool, quick: bool) -> dict:
    jobs = [job(out, work, "tune", m, lr, 0, quick) for m in METHODS for lr in (LRS[1:3] if quick else LRS)]
    results = launch(__file__, jobs, workers, fresh)
    grid = {m: {f"{r['job']['lr']:g}": {"score": r["score"], "pair_accuracy": r["like_pairs"]["pair_accuracy"],
                                        "held_accuracy": r["held"]["accuracy"], "like_format": r["like_pairs"]["format"]}
                for r in results if r["job"]["method"] == m} for m in METHODS}
    best = {m: max(g, key=lambda lr: (g[lr]["score"], g[lr]["held_accuracy"])) for m, g in grid.items()}
    tuning = {"grid": grid, "best_lr": {m: float(lr) for m, lr in best.items()}}
    (out / "tuning.json").write_text(json.dumps(tuning, indent=1) + "\n")
    return tuning


def run(out: Path, work: Path, tuning: dict, workers: int, fresh: bool, quick: bool) -> list[dict]:
    jobs = [job(out, work, "run", m, tuning["best_lr"][m], s, quick) for m in METHODS for s in SEEDS]
    return launch(__file__, jobs, workers, fresh)


def report(out: Path) -> dict:
    base_res = json.loads((out / "raw" / "base.json").read_text())
    tuning = json.loads((out / "tuning.json").read_text())
    summary = {"base": base_res, "data": json.loads((out / "data.json").read_text()), "tuning": tuning,
               "test": {}}
    keys = ("pair_accuracy", "pair_margin", "format", "accuracy", "both")
    for m in METHODS:
        runs = [json.loads(p.read_text()) for p in sorted((out / "raw" / "run").glob(f"{m}-lr*.json"))]
        summary["test"][m] = {"lr": tuning["best_lr"][m], **{
            f"{where}/{k}": mean_sd([r[where][k] for r in runs]) for where in ("held", "like_pairs") for k in keys}}
        summary["test"][m]["held_accuracy_lost"] = \
            base_res["test"]["held"]["accuracy"] - summary["test"][m]["held/accuracy"]["mean"]
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    lines = ["Test split, mean of seeds 0-2 (per seed in brackets). Pairs: held-out pairs built like the training "
             "ones (200 problems without carries; held: 200 with carries); the model prefers the chosen answer "
             "when it finds it likelier. Greedy answers on the same problems: new layout, accuracy.", "",
             "| method (lr) | prefers chosen: like the pairs | prefers chosen: held | held accuracy (greedy) "
             "| accuracy lost | new layout, greedy: like the pairs / held | like the pairs: accuracy |",
             "|---|---|---|---|---|---|---|"]
    b = base_res["test"]
    lines.append(f"| base (ReVal-trained) | {pct(b['like_pairs']['pair_accuracy'])} | {pct(b['held']['pair_accuracy'])} "
                 f"| {pct(b['held']['accuracy'])} | | {pct(b['like_pairs']['format'])} / {pct(b['held']['format'])} | "
                 f"{pct(b['like_pairs']['accuracy'])} |")
    for m, t in summary["test"].items():
        cell = lambda k: f"{pct(t[k]['mean'])} ({', '.join(f'{100 * v:.0f}' for v in t[k]['values'])})"  # noqa: E731
        lines.append(f"| {m} ({t['lr']:g}) | {cell('like_pairs/pair_accuracy')} | {cell('held/pair_accuracy')} | "
                     f"{cell('held/accuracy')} | {100 * t['held_accuracy_lost']:.1f} pts | "
                     f"{pct(t['like_pairs/format']['mean'])} / {pct(t['held/format']['mean'])} | "
                     f"{cell('like_pairs/accuracy')} |")
    lrs = list(tuning["grid"][next(iter(METHODS))])
    grid = ["", "Validation (seed 0, 100 problems / pairs of each kind): score = prefers chosen (like the pairs) x "
            "held accuracy, with (prefers chosen / held accuracy / new layout where taught), by learning rate:", "",
            "| method | " + " | ".join(lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m, g in tuning["grid"].items():
        grid.append(f"| {m} | " + " | ".join(f"**{100 * v['score']:.0f}%** ({100 * v['pair_accuracy']:.0f} / "
                                             f"{100 * v['held_accuracy']:.0f} / {100 * v['like_format']:.0f})"
                                             for v in g.values()) + " |")
    (out / "summary.md").write_text("\n".join(lines + grid) + "\n")
    print("\n".join(lines + grid))
    return summary


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        return child_main(run_job)
    a, out, work = study_args(__doc__, "preferences", OUT)
    if a.stage != "report":
        model = base(work, a.quick)
        data(out, work, model, a.quick)
        evaluate_base(out, work, model, a.quick)
        tuning = tune(out, work, a.workers, a.fresh, a.quick) if a.stage in ("all", "tune") else \
            json.loads((out / "tuning.json").read_text())
        if a.stage in ("all", "run"):
            run(out, work, tuning, a.workers, a.fresh, a.quick)
    if a.stage in ("all", "report", "run"):
        report(out)


if __name__ == "__main__":
    main()
