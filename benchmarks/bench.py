"""Benchmark: accuracy per generated answer and per second, ReVal vs TBRM vs our GRPO vs
TRL's GRPOTrainer, over seeds, from the shipped model on the embedded task.

    pip install -e ".[bench]"                      # pins trl; torch==2.13.0 first, as always
    python benchmarks/bench.py tune                # validation grid -> benchmarks/results/tuning.json
    python benchmarks/bench.py run                 # test-split runs -> benchmarks/results/
    python benchmarks/bench.py report              # summary.json + plots again from the raw curves
    python benchmarks/bench.py all --quick         # tune + run at smoke-test sizes (< 5 min), runs/bench-quick

Three studies, all with the same prompts per round, answers per prompt, evaluation set
and budget of generated answers for every method:

  main        16 prompts x 8 answers per round, 15 rounds (1,920 answers), greedy accuracy
              on the 200 test problems after every round, seeds 0-2. Methods: ReVal, TBRM,
              our GRPO, TRL GRPOTrainer, and TRL with rollout reuse (num_iterations = 2).
  k_sweep     ReVal with K = 1, 2, 4, 8 updates per round on the same task (8 rounds).
  one_prompt  the paper's one-prompt setting: training on a single problem, 16 answers
              per round, score = sampled accuracy on that problem (mean of 64), rounds
              until it reaches 95%. Hard / medium / easy problems are picked from the test
              split by the starting model's mean accuracy over 128 samples.

Learning rates come from `tune`, which gives every method the same grid on the validation
split (and, for the one-prompt study, a medium validation problem); the test split is never
used for a choice. Each run is a subprocess, so its peak RSS is its own.
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Literal

import tyro

from reval.config import TrainConfig
from reval.demo import set_field
from reval.metrics import read_metrics
from reval.model import default_model_path, format_prompt, load_model
from reval.rewards import correctness_reward
from reval.tasks.arithmetic import EVAL_SEED, Problem, split

RESULTS = Path(__file__).parent / "results"

# name -> (implementation, algorithm, K). K is updates per round; for TRL it is num_iterations.
METHODS: dict[str, tuple[str, str, int]] = {
    "reval": ("reval", "reval", 2),
    "tbrm": ("reval", "tbrm", 2),
    "grpo": ("reval", "grpo", 1),
    "trl_grpo": ("trl", "grpo", 1),
    "trl_grpo_reuse": ("trl", "grpo", 2),
}
GRPO_VARIANTS = ("grpo", "trl_grpo", "trl_grpo_reuse")
ONE_PROMPT_METHODS: dict[str, tuple[str, int]] = {  # name -> (algorithm, K)
    "grpo": ("grpo", 1), "reval_k1": ("reval", 1), "reval_k2": ("reval", 2),
    "reval_k4": ("reval", 4), "reval_k8": ("reval", 8),
}
DIFFICULTY = {"hard": 0.15, "medium": 0.40, "easy": 0.70}  # starting model's mean accuracy


@dataclass
class Budget:
    """Sizes of one benchmark; `quick` shrinks every one of them."""

    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 15
    sweep_rounds: int = 8
    sweep_ks: tuple[int, ...] = (1, 2, 4, 8)
    num_eval: int = 200
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)  # the tuning grid, the same for every method
    one_prompt_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    one_prompt_rounds: int = 30
    one_prompt_difficulties: tuple[str, ...] = ("hard", "medium", "easy")
    scan_problems: int = 64  # candidates for the one-prompt study
    scan_samples: int = 128
    methods: tuple[str, ...] = tuple(METHODS)
    one_prompt_methods: tuple[str, ...] = tuple(ONE_PROMPT_METHODS)


QUICK = Budget(seeds=(0,), rounds=2, sweep_rounds=2, sweep_ks=(1, 2, 4), num_eval=30, lrs=(3e-4,),
               one_prompt_lrs=(1e-3,), one_prompt_rounds=3, one_prompt_difficulties=("easy",),
               scan_problems=6, scan_samples=16, one_prompt_methods=("grpo", "reval_k4"))


@dataclass
class BenchConfig:
    stage: tyro.conf.Positional[Literal["tune", "run", "all", "report", "child"]]
    """tune: validation grid; run: test-split studies; all: both; report: summary and plots again."""
    quick: bool = False
    """Smoke-test sizes (under 5 minutes on 2 cores); writes to runs/bench-quick."""
    out: Path | None = None
    """Results directory; default benchmarks/results (runs/bench-quick with --quick)."""
    spec: Path | None = None
    """(internal) the run spec of a `child` stage."""


# -- one run (in a child process) -------------------------------------------------------------


@dataclass
class RunSpec:
    method: str  # a METHODS or ONE_PROMPT_METHODS name
    impl: str  # "reval" | "trl"
    algo: str
    k: int
    lr: float
    seed: int
    rounds: int
    split: str  # evaluation split: "validation" (tuning) or "test"
    num_eval: int
    run_dir: str
    result: str
    problem: dict | None = None  # one-prompt setting: the single training and evaluation problem
    stop_at: float | None = None  # one-prompt: stop once the score reaches this


def run_child(specs: list[RunSpec]) -> None:
    """Run specs one after another in this process; peak RSS is the process's so far."""
    for spec in specs:
        t0 = time.time()
        result = run_ours(spec) if spec.impl == "reval" else run_trl(spec)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
        result["spec"] = asdict(spec)
        Path(spec.result).write_text(json.dumps(result) + "\n")
        last = result["curve"][-1]
        print(f"  {spec.method:15s} seed {spec.seed} lr {spec.lr:g} K {spec.k}: final {last['accuracy']:.3f} "
              f"after {last['samples']} answers, {time.time() - t0:.0f} s", flush=True)


def run_ours(spec: RunSpec) -> dict:
    from reval.train import train

    tc = TrainConfig(algo=spec.algo, rounds=spec.rounds, seed=spec.seed, out=Path(spec.run_dir),
                     progress=False, checkpoint_every=0)
    for key, value in {"buffer.updates_per_round": spec.k, "optim.lr": spec.lr, "eval.every": 1,
                       "eval.samples": 0, "task.eval_split": spec.split, "task.num_test": spec.num_eval,
                       "task.num_validation": spec.num_eval}.items():
        set_field(tc, key, value)
    kwargs = {}
    if spec.problem is not None:  # one prompt, 16 answers per round, scored by mean@64 on it
        problem = Problem(**spec.problem)
        tc.rollout.prompts_per_round, tc.rollout.samples_per_prompt = 1, 16
        tc.optim.micro_batch_size = 16
        tc.buffer.capacity = 5 * 16  # the main setting's M / B = 5 rounds
        tc.eval.samples = 64
        kwargs = {"problems": [problem], "eval_problems": [problem],
                  "should_stop": lambda rec: rec["eval/mean@64"] >= spec.stop_at}
    train(tc, **kwargs)
    records = read_metrics(Path(spec.run_dir) / "metrics.jsonl")
    score = "eval/mean@64" if spec.problem is not None else "eval/accuracy"
    curve = [{"round": r["round"], "samples": r["samples"], "seconds": round(r["seconds"], 3),
              "accuracy": r[score]} for r in records if score in r]
    rounds = [r for r in records if "perf/generate_seconds" in r]
    shutil.rmtree(Path(spec.run_dir) / "checkpoints", ignore_errors=True)  # keep only the metrics
    return {"curve": curve, "generate_seconds": sum(r["perf/generate_seconds"] for r in rounds),
            "update_seconds": sum(r["perf/update_seconds"] for r in rounds)}


def run_trl(spec: RunSpec) -> dict:
    """TRL's GRPOTrainer at our settings: same weights, prompts per round, reward and budget."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reval.evaluate import evaluate

    tc = TrainConfig()  # our defaults, so both sides read the same numbers
    P, G, max_len = tc.rollout.prompts_per_round, tc.rollout.samples_per_prompt, tc.rollout.max_new_tokens
    model, tokenizer = load_model(default_model_path())
    # The same prompts, in the same rounds, as our loop draws them (random.Random(seed).sample).
    train_set = split("train", tc.task.num_train, tc.task.digits, seed=spec.seed)
    rng = random.Random(spec.seed)
    rows = [p for _ in range(spec.rounds) for p in rng.sample(train_set, P)]
    dataset = Dataset.from_list([{"prompt": format_prompt(tokenizer, p.question), "answer": p.answer}
                                 for p in rows])
    eval_set = split(spec.split, spec.num_eval, tc.task.digits, seed=EVAL_SEED)
    eos = tokenizer.eos_token_id

    def correctness(prompts, completions, completion_ids, answer, **_):
        # ours gives reward 0 to answers cut at max_new_tokens without EOS; so does this
        rewards = correctness_reward(completions, answer)
        return [0.0 if len(ids) >= max_len and ids[-1] != eos else r for r, ids in zip(rewards, completion_ids)]

    args = GRPOConfig(
        output_dir=spec.run_dir, seed=spec.seed, use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        # one optimizer step per P x G answers, accumulated over micro-batches of 64 like ours
        per_device_train_batch_size=tc.optim.micro_batch_size,
        gradient_accumulation_steps=P * G // tc.optim.micro_batch_size,
        num_generations=G, num_iterations=spec.k, max_steps=spec.rounds * spec.k, shuffle_dataset=False,
        max_completion_length=max_len, temperature=tc.rollout.temperature, top_p=tc.rollout.top_p, top_k=0,
        learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=tc.optim.weight_decay, max_grad_norm=tc.optim.max_grad_norm,
        gradient_checkpointing=False, disable_dropout=True,
        # the loss as ours: no KL, clip 0.2 / 0.28, token-mean over the batch, group std scaling
        beta=0.0, epsilon=tc.loss.clip_low, epsilon_high=tc.loss.clip_high, loss_type="dapo",
        scale_rewards="group",
    )
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[correctness],
                          args=args, train_dataset=dataset)

    timing = {"generate": 0.0, "eval": 0.0, "start": 0.0}
    generate = trainer._generate  # noqa: SLF001 - timed only, behaviour unchanged (trl pinned)

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        timing["generate"] += time.perf_counter() - t0
        return out

    trainer._generate = timed_generate  # noqa: SLF001
    curve: list[dict] = []

    def record(step: int) -> None:
        t0 = time.perf_counter()
        seconds = t0 - timing["start"] - timing["eval"] if step else 0.0
        acc = evaluate(trainer.model, tokenizer, [p.question for p in eval_set],  # generate is no_grad
                       [p.answer for p in eval_set], max_new_tokens=max_len)["accuracy"]
        rnd = step // spec.k
        curve.append({"round": rnd, "samples": rnd * P * G, "seconds": round(seconds, 3), "accuracy": acc})
        timing["eval"] += time.perf_counter() - t0

    class EvalEveryRound(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record(0)
            timing["start"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % spec.k == 0:
                record(state.global_step)

    trainer.add_callback(EvalEveryRound())
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would drown the progress lines
    trainer.train()
    train_seconds = curve[-1]["seconds"]
    return {"curve": curve, "generate_seconds": timing["generate"],
            "update_seconds": train_seconds - timing["generate"]}


def launch(*specs: RunSpec) -> list[dict]:
    """Run specs in a fresh process (own torch state; own peak RSS when given one spec)."""
    for spec in specs:
        for path in (Path(spec.run_dir).parent, Path(spec.result).parent):
            path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(spec.run_dir, ignore_errors=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([asdict(s) for s in specs], f)
    proc = subprocess.run([sys.executable, __file__, "child", "--spec", f.name], stderr=subprocess.PIPE,
                          text=True)
    Path(f.name).unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({specs[0].method} seed {specs[0].seed} ...):\n"
                           f"{proc.stderr[-3000:]}")
    return [json.loads(Path(spec.result).read_text()) for spec in specs]


def make_spec(out: Path, study: str, method: str, seed: int, lr: float, rounds: int, split_name: str,
              num_eval: int, k: int | None = None, problem: Problem | None = None) -> RunSpec:
    if problem is None:
        impl, algo, default_k = METHODS[method]
    else:
        impl, (algo, default_k) = "reval", ONE_PROMPT_METHODS[method]
    k = k or default_k
    name = f"{study}/{method}-k{k}-lr{lr:g}-s{seed}"
    return RunSpec(method=method, impl=impl, algo=algo, k=k, lr=lr, seed=seed, rounds=rounds,
                   split=split_name, num_eval=num_eval, run_dir=str(out / "runs" / name),
                   result=str(out / "raw" / f"{name.replace('/', '__')}.json"),
                   problem=None if problem is None else asdict(problem),
                   stop_at=None if problem is None else 0.95)


# -- one-prompt problems ----------------------------------------------------------------------


def pick_problems(split_name: str, budget: Budget, targets: dict[str, float]) -> dict[str, dict]:
    """Problems whose starting-model mean accuracy (over `scan_samples`) is closest to each target."""
    import torch

    from reval.evaluate import evaluate

    model, tokenizer = load_model(default_model_path())
    torch.manual_seed(0)
    candidates = split(split_name, budget.scan_problems, seed=EVAL_SEED)
    rates = []
    for p in candidates:
        res = evaluate(model, tokenizer, [p.question], [p.answer], samples=budget.scan_samples,
                       max_new_tokens=TrainConfig().rollout.max_new_tokens)
        rates.append(res[f"mean@{budget.scan_samples}"])
    picked, used = {}, set()
    for name, target in targets.items():
        i = min((i for i in range(len(candidates)) if i not in used), key=lambda i: abs(rates[i] - target))
        used.add(i)
        picked[name] = {"problem": asdict(candidates[i]), "start_accuracy": rates[i], "index": i}
    return picked


# -- stages -----------------------------------------------------------------------------------


def tune(out: Path, budget: Budget) -> dict:
    """Same lr grid for every method on the validation split; winner = best mean accuracy."""
    t0 = time.time()
    grid: dict[str, dict[str, float]] = {}
    print("tuning, main setting (validation split, seed 0)")
    for method in budget.methods:
        for lr in budget.lrs:
            spec = make_spec(out, "tune", method, 0, lr, budget.rounds, "validation", budget.num_eval)
            curve = launch(spec)[0]["curve"]
            grid.setdefault(method, {})[f"{lr:g}"] = mean(p["accuracy"] for p in curve[1:])
    print("tuning, one-prompt setting (a medium validation problem, seed 0)")
    tune_problem = pick_problems("validation", budget, {"medium": DIFFICULTY["medium"]})["medium"]
    one_grid: dict[str, dict[str, dict]] = {}
    specs = [make_spec(out, "tune_one_prompt", method, 0, lr, budget.one_prompt_rounds, "validation", 1,
                       problem=Problem(**tune_problem["problem"]))
             for method in budget.one_prompt_methods for lr in budget.one_prompt_lrs]
    for spec, result in zip(specs, launch(*specs)):  # one process: these runs are short
        one_grid.setdefault(spec.method, {})[f"{spec.lr:g}"] = {
            "rounds_to_95": rounds_to(result["curve"], 0.95),
            "mean_score": round(mean(p["accuracy"] for p in result["curve"][1:]), 4)}
    result = {
        "rule": "main: highest mean greedy validation accuracy over rounds 1..R; one-prompt: fewest rounds "
                "to a 95% score on the tuning problem, ties (and never) broken by the higher mean score",
        "main": {"grid": grid, "winner": {m: float(max(g, key=g.get)) for m, g in grid.items()}},
        "one_prompt": {"problem": tune_problem, "grid": one_grid,
                       "winner": {m: float(min(g, key=lambda lr: (g[lr]["rounds_to_95"] or 10**9,
                                                                  -g[lr]["mean_score"])))
                                  for m, g in one_grid.items()}},
        "minutes": round((time.time() - t0) / 60, 1),
    }
    (out / "tuning.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'tuning.json'}")
    return result


def run(out: Path, budget: Budget, tuning: dict) -> None:
    t0 = time.time()
    lr_main, lr_one = tuning["main"]["winner"], tuning["one_prompt"]["winner"]
    print(f"main: {budget.rounds} rounds x 128 answers, test split")
    for seed in budget.seeds:
        for method in budget.methods:
            launch(make_spec(out, "main", method, seed, lr_main[method], budget.rounds, "test", budget.num_eval))
    print("k_sweep: ReVal with K updates per round, test split (K = 2: the main runs, cut)")
    for seed in budget.seeds:
        for k in budget.sweep_ks:
            if k == METHODS["reval"][2] and "reval" in budget.methods:
                continue
            launch(make_spec(out, "k_sweep", "reval", seed, lr_main["reval"], budget.sweep_rounds, "test",
                             budget.num_eval, k=k))
    print("one_prompt: single test problems of three difficulties")
    picked = pick_problems("test", budget, {d: DIFFICULTY[d] for d in budget.one_prompt_difficulties})
    (out / "one_prompt_problems.json").write_text(json.dumps(picked, indent=2) + "\n")
    for name, info in picked.items():  # one process per problem: these runs are short
        launch(*[make_spec(out, f"one_prompt_{name}", method, seed, lr_one[method], budget.one_prompt_rounds,
                           "test", 1, problem=Problem(**info["problem"]))
                 for seed in budget.seeds for method in budget.one_prompt_methods])
    (out / "run_minutes.json").write_text(json.dumps({"minutes": round((time.time() - t0) / 60, 1)}) + "\n")
    report(out)


# -- summary and plots ------------------------------------------------------------------------


def rounds_to(curve: list[dict], target: float) -> int | None:
    return next((p["round"] for p in curve if p["accuracy"] >= target), None)


def first_reaching(curve: list[dict], target: float, key: str) -> float | None:
    return next((p[key] for p in curve if p["accuracy"] >= target), None)


def load_raw(out: Path, study: str) -> dict[str, list[dict]]:
    """method (or method@K for the sweep) -> results sorted by seed."""
    runs: dict[str, list[dict]] = {}
    for path in sorted((out / "raw").glob(f"{study}__*.json")):
        r = json.loads(path.read_text())
        key = f"K={r['spec']['k']}" if study == "k_sweep" else r["spec"]["method"]
        runs.setdefault(key, []).append(r)
    if study == "k_sweep" and runs:  # the main ReVal runs are the sweep's K = 2, cut to its length
        n = max(len(r["curve"]) for rs in runs.values() for r in rs)
        for r in load_raw(out, "main").get("reval", []):
            runs.setdefault(f"K={r['spec']['k']}", []).append({**r, "curve": r["curve"][:n]})
    for v in runs.values():
        v.sort(key=lambda r: r["spec"]["seed"])
    return runs


def ratio(numerators: list, denominators: list) -> float | None:
    """Mean over seeds of a / b; None if either never reached the target in some seed."""
    if None in numerators or None in denominators or not numerators:
        return None
    return round(mean(numerators) / mean(denominators), 2)


def summarise(out: Path) -> dict:
    main = load_raw(out, "main")
    finals = {m: [r["curve"][-1]["accuracy"] for r in rs] for m, rs in main.items()}
    best_grpo = max((m for m in GRPO_VARIANTS if m in finals), key=lambda m: mean(finals[m]))
    target = round(0.95 * mean(finals[best_grpo]), 4)
    per = {key: {m: [first_reaching(r["curve"], target, key) for r in rs] for m, rs in main.items()}
           for key in ("samples", "seconds")}
    summary = {
        "target_accuracy": target,
        "target_rule": f"0.95 x the mean final test accuracy of the best GRPO variant ({best_grpo})",
        "seeds": [r["spec"]["seed"] for r in next(iter(main.values()))],
        "budget_answers": next(iter(main.values()))[0]["curve"][-1]["samples"],
        "samples_to_target": per["samples"],
        "seconds_to_target": per["seconds"],
        "final_accuracy": finals,
        "final_accuracy_mean": {m: round(mean(v), 4) for m, v in finals.items()},
        "lr": {m: rs[0]["spec"]["lr"] for m, rs in main.items()},
        "updates_per_round": {m: rs[0]["spec"]["k"] for m, rs in main.items()},
        "generate_seconds": {m: [round(r["generate_seconds"], 1) for r in rs] for m, rs in main.items()},
        "update_seconds": {m: [round(r["update_seconds"], 1) for r in rs] for m, rs in main.items()},
        "peak_rss_mb": {m: [round(r["peak_rss_mb"]) for r in rs] for m, rs in main.items()},
        "answers_ratio_vs_reval": {m: ratio(per["samples"][m], per["samples"]["reval"])
                                   for m in GRPO_VARIANTS if m in main and "reval" in main},
        "seconds_ratio_vs_reval": {m: ratio(per["seconds"][m], per["seconds"]["reval"])
                                   for m in GRPO_VARIANTS if m in main and "reval" in main},
    }
    sweep = load_raw(out, "k_sweep")
    if sweep:
        summary["k_sweep"] = {k: {"rounds": len(rs[0]["curve"]) - 1,
                                  "samples_to_target": [first_reaching(r["curve"], target, "samples") for r in rs],
                                  "final_accuracy": [r["curve"][-1]["accuracy"] for r in rs],
                                  "seconds": [round(r["curve"][-1]["seconds"], 1) for r in rs]}
                              for k, rs in sorted(sweep.items(), key=lambda kv: int(kv[0][2:]))}
    problems_file = out / "one_prompt_problems.json"
    if problems_file.exists():
        one = {}
        for name, info in json.loads(problems_file.read_text()).items():
            runs = load_raw(out, f"one_prompt_{name}")
            rounds = {m: [rounds_to(r["curve"], 0.95) for r in rs] for m, rs in runs.items()}
            best = min((m for m in rounds if m != "grpo"), key=lambda m: (None in rounds[m], mean(
                x or 10**9 for x in rounds[m])), default=None)
            one[name] = {"question": info["problem"]["question"], "start_accuracy": info["start_accuracy"],
                         "rounds_to_95": rounds, "max_rounds": max(len(r["curve"]) - 1 for rs in runs.values()
                                                                   for r in rs),
                         "best_reval": best,
                         "grpo_over_best_reval": ratio(rounds.get("grpo", [None]), rounds.get(best, [None]))}
        summary["one_prompt"] = one
    return summary


def report(out: Path) -> dict:
    summary = summarise(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(out, summary)
    print_table(summary)
    print(f"wrote {out / 'summary.json'} and the plots in {out}")
    return summary


def plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = load_raw(out, "main")
    for xkey, xlabel, fname in (("samples", "answers generated", "accuracy_vs_answers.png"),
                                ("seconds", "training seconds (generation + updates, eval excluded)",
                                 "accuracy_vs_seconds.png")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, rs in main.items():
            n = min(len(r["curve"]) for r in rs)
            xs = [mean(r["curve"][i][xkey] for r in rs) for i in range(n)]
            accs = [[100 * r["curve"][i]["accuracy"] for r in rs] for i in range(n)]
            ax.plot(xs, [mean(a) for a in accs], marker="o", ms=3, label=f"{method} (mean of {len(rs)})")
            ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs], alpha=0.15)
        ax.axhline(100 * summary["target_accuracy"], color="grey", ls="--", lw=1, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy, greedy (%)")
        ax.set_title("Embedded addition task: mean over seeds, band = min..max")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if "k_sweep" in summary:
        ks = [int(k[2:]) for k in summary["k_sweep"]]
        finals = [[100 * a for a in v["final_accuracy"]] for v in summary["k_sweep"].values()]
        axes[0].errorbar(ks, [mean(f) for f in finals], yerr=[[mean(f) - min(f) for f in finals],
                         [max(f) - mean(f) for f in finals]], marker="o", capsize=3, label="ReVal")
        grpo_final = summary["final_accuracy"].get("grpo")
        if grpo_final:
            axes[0].axhline(100 * mean(grpo_final), color="C3", ls="--",
                            label=f"our GRPO after {summary['budget_answers']} answers")
        rounds = next(iter(summary["k_sweep"].values()))["rounds"]
        _k_axis(axes[0], f"test accuracy after {rounds} rounds (%)", "Full task")
    for i, (name, res) in enumerate(summary.get("one_prompt", {}).items()):
        cap = res["max_rounds"] + 1  # "never" drawn above the budget
        ks, ys = [], []
        for m, rounds in res["rounds_to_95"].items():
            if m.startswith("reval_k"):
                ks.append(int(m[7:]))
                ys.append(mean(r or cap for r in rounds))
        order = sorted(range(len(ks)), key=ks.__getitem__)
        line = axes[1].plot([ks[j] for j in order], [ys[j] for j in order], marker="o",
                            label=f"ReVal, {name} ({100 * res['start_accuracy']:.0f}% at start)", color=f"C{i}")
        if "grpo" in res["rounds_to_95"]:
            axes[1].axhline(mean(r or cap for r in res["rounds_to_95"]["grpo"]), ls="--",
                            color=line[0].get_color(), label=f"GRPO, {name}")
    if summary.get("one_prompt"):
        _k_axis(axes[1], "rounds to a 95% score (mean over seeds)", "One-prompt setting (never = budget + 1)")
    fig.tight_layout()
    fig.savefig(out / "k_sweep.png", dpi=100)
    plt.close(fig)


def _k_axis(ax, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (updates per generation round)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(values, scale=1.0, unit=""):
        return " / ".join("never" if v is None else f"{scale * v:.0f}{unit}" for v in values)

    t = Table(title=f"main study, test split; target = {100 * summary['target_accuracy']:.1f}%")
    for col in ("method", "lr", "K", "answers to target", "seconds to target", "final acc", "peak RSS MB"):
        t.add_column(col, justify="right")
    for m in summary["final_accuracy"]:
        t.add_row(m, f"{summary['lr'][m]:g}", str(summary["updates_per_round"][m]),
                  fmt(summary["samples_to_target"][m]), fmt(summary["seconds_to_target"][m]),
                  fmt(summary["final_accuracy"][m], 100, "%"), fmt(summary["peak_rss_mb"][m]))
    Console().print(t)
    for name, res in summary.get("one_prompt", {}).items():
        print(f"one prompt, {name} ({100 * res['start_accuracy']:.0f}% at start): rounds to 95% "
              + ", ".join(f"{m} {fmt(r)}" for m, r in res["rounds_to_95"].items()))


def main() -> None:
    cfg = tyro.cli(BenchConfig)
    if cfg.stage == "child":
        run_child([RunSpec(**d) for d in json.loads(cfg.spec.read_text())])
        return
    budget = QUICK if cfg.quick else Budget()
    out = cfg.out or (Path("runs/bench-quick") if cfg.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.stage in ("tune", "all"):
        tune(out, budget)
    if cfg.stage in ("run", "all"):
        tuning_file = out / "tuning.json"
        if not tuning_file.exists():
            raise SystemExit(f"{tuning_file} not found: run `python benchmarks/bench.py tune"
                             f"{' --quick' if cfg.quick else ''}` first")
        run(out, budget, json.loads(tuning_file.read_text()))
    if cfg.stage == "report":
        report(out)


if __name__ == "__main__":
    main()
