"""Benchmark: accuracy per generated answer and per second, ReVal vs TBRM vs our GRPO vs
TRL's GRPOTrainer, each with its sample-reuse knob tuned like its learning rate.

    pip install -e ".[bench]"                      # pins trl; torch==2.13.0 first, as always
    python benchmarks/bench.py tune --task mul     # validation grid -> benchmarks/results/mul/tuning.json
    python benchmarks/bench.py run --task mul      # winners on the test split -> benchmarks/results/mul/
    python benchmarks/bench.py report --task mul   # summary.json + plots again from the raw curves
    python benchmarks/bench.py all --quick         # every stage at smoke-test size (< 5 min)

`report` writes summary.json (every number), summary.md (the tables) and the plots.

Every method starts from the task's shipped warm start and gets the same prompts per round
(drawn in the same order), answers per prompt, reward, evaluation set and budget of
generated answers. Studies:

  main        P x G = 16 x 8 answers per round, `rounds` rounds, greedy accuracy on the
              test problems after every round, 5 seeds. Each method's reuse knob is tuned on
              the validation split together with its learning rate: K updates per round for
              ReVal and TBRM (K = 1 is TBRM as published, on-policy; K > 1 is TBRM with
              ReVal's replay buffer, `tbrm_replay`), PPO-style reuse of the fresh batch K for
              our GRPO, `num_iterations` for TRL.
  n1          one answer per prompt (P x G = 128 x 1), ReVal vs our GRPO at their tuned
              settings: rounds and seconds to target (the paper's N = 1 study).
  why         validation only, seed 0: ReVal's tuned setting with one thing changed (beta,
              reward variant, reference reset, buffer size), to find what holds it back.
  claims      the paper's ablations on the test split, 3 seeds (on `mul` 12 rounds: K,
              reward variant, beta, a reference reset, TBRM with replay; on `add` a beta sweep).
  one_prompt  the paper's one-prompt setting (training on a single problem, 16 answers per
              round, score = sampled accuracy on it, rounds until it reaches 95%), with its
              own learning-rate tuning on a validation problem.

The test split is never used for a choice. Each run is a child process (its peak RSS is its
own); with `--workers 2` two run at once, each on one thread, so that every run of a stage
shares the machine the same way. A stage skips runs whose result file already exists, so
an interrupted stage continues where it stopped (`--fresh` starts over).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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
from reval.tasks import TASKS
from reval.tasks.arithmetic import EVAL_SEED, Problem

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Method:
    impl: str  # "reval" (ours) or "trl"
    algo: str  # the algorithm at K = 1
    ks: tuple[int, ...]  # grid of the reuse knob
    reuse_algo: str | None = None  # the algorithm for K > 1, where it differs


METHODS: dict[str, Method] = {
    "reval": Method("reval", "reval", (1, 2, 4, 8)),
    "tbrm": Method("reval", "tbrm", (1, 2, 4, 8), reuse_algo="tbrm_replay"),
    "grpo": Method("reval", "grpo", (1, 2, 4)),
    "trl_grpo": Method("trl", "grpo", (1, 2, 4)),
}
GRPO_VARIANTS = ("grpo", "trl_grpo")
ONE_PROMPT_METHODS: dict[str, tuple[str, int]] = {  # name -> (algorithm, K)
    "grpo": ("grpo", 1), "reval_k1": ("reval", 1), "reval_k2": ("reval", 2),
    "reval_k4": ("reval", 4), "reval_k8": ("reval", 8),
}
DIFFICULTY = {"hard": 0.15, "medium": 0.40, "easy": 0.70}  # starting model's mean accuracy


def algo_of(method: str, k: int) -> str:
    m = METHODS[method]
    return m.reuse_algo if k > 1 and m.reuse_algo else m.algo


@dataclass
class Budget:
    """Sizes of one benchmark; `QUICK` shrinks every one of them."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    rounds: int = 24
    num_eval: int = 200
    tune_num_eval: int = 100  # tuning: validation problems, evaluated every `tune_eval_every` rounds
    tune_eval_every: int = 2
    lrs: tuple[float, ...] = (1e-4, 3e-4)  # the tuning grid, the same for every method (1e-3 collapsed)
    ks: dict[str, tuple[int, ...]] = field(default_factory=lambda: {m: v.ks for m, v in METHODS.items()})
    methods: tuple[str, ...] = tuple(METHODS)
    n1_seeds: tuple[int, ...] = (0, 1, 2)
    claim_seeds: tuple[int, ...] = (0, 1, 2)
    claim_rounds: dict[str, int] = field(default_factory=lambda: {"add": 15, "mul": 12})  # half the budget on mul
    claim_eval_every: int = 2
    n1_methods: tuple[str, ...] = ("reval", "grpo")
    one_prompt_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    one_prompt_rounds: int = 30
    one_prompt_seeds: tuple[int, ...] = (0, 1, 2)
    one_prompt_difficulties: tuple[str, ...] = ()
    scan_problems: int = 64  # candidates for the one-prompt study
    scan_samples: int = 128
    one_prompt_methods: tuple[str, ...] = tuple(ONE_PROMPT_METHODS)
    variants: int | None = None  # the why and claims studies run only their first N variants


QUICK = Budget(seeds=(0,), rounds=2, num_eval=20, tune_num_eval=20, tune_eval_every=1, lrs=(3e-4,),
               ks={"reval": (1, 2), "tbrm": (1,), "grpo": (1,), "trl_grpo": (1,)},
               n1_seeds=(0,), claim_seeds=(0,), claim_rounds={"add": 2, "mul": 2}, claim_eval_every=1,
               one_prompt_lrs=(1e-3,), one_prompt_rounds=2,
               one_prompt_seeds=(0,), one_prompt_difficulties=("easy",), scan_problems=4, scan_samples=8,
               one_prompt_methods=("grpo", "reval_k4"), variants=3)


@dataclass
class BenchConfig:
    stage: tyro.conf.Positional[Literal["tune", "run", "all", "report", "child"]]
    """tune: validation grid; run: test-split studies; all: both; report: summary and plots again."""
    task: Literal["add", "mul"] = "mul"
    """Embedded task (its shipped warm start is the starting model)."""
    quick: bool = False
    """Smoke-test sizes, every study (under 5 minutes on 2 cores); writes to runs/bench-quick/<task>."""
    workers: int = 2
    """Runs at once (each on one thread when more than one)."""
    rounds: int | None = None
    """Rounds per run of the main and N = 1 studies; None: the budget's."""
    studies: tuple[str, ...] = ("main",)
    """Studies of `run`: main, n1, claims, one_prompt (test split) and why (validation)."""
    fresh: bool = False
    """Re-run runs whose result file exists."""
    out: Path | None = None
    """Results directory; default benchmarks/results/<task> (runs/bench-quick/<task> with --quick)."""
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
    task: str = "mul"
    prompts_per_round: int = 16
    samples_per_prompt: int = 8
    problem: dict | None = None  # one-prompt setting: the single training and evaluation problem
    stop_at: float | None = None  # one-prompt: stop once the score reaches this
    eval_every: int = 1  # evaluate every N rounds (and after the last)
    overrides: dict = field(default_factory=dict)  # further config fields ("loss.beta": 0.02)
    label: str = ""  # the variant's name in a study (default: the method's)
    measures: tuple[str, ...] = ()  # measured on the final model (`final_measures`): "diversity", "held_add"


def run_child(spec: RunSpec) -> None:
    t0 = time.time()
    result = run_ours(spec) if spec.impl == "reval" else run_trl(spec)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result["cpu_seconds"] = time.process_time()
    result["spec"] = asdict(spec)
    Path(spec.result).write_text(json.dumps(result) + "\n")
    last = result["curve"][-1]
    print(f"  {spec.method:9s} seed {spec.seed} lr {spec.lr:g} K {spec.k}: final {last['accuracy']:.3f} "
          f"after {last['samples']} answers, {time.time() - t0:.0f} s", flush=True)


def run_ours(spec: RunSpec) -> dict:
    from reval.train import train

    tc = TrainConfig(algo=spec.algo, rounds=spec.rounds, seed=spec.seed, out=Path(spec.run_dir),
                     progress=False, checkpoint_every=0)
    B = spec.prompts_per_round * spec.samples_per_prompt
    for key, value in {"task.name": spec.task, "buffer.updates_per_round": spec.k, "optim.lr": spec.lr,
                       "eval.every": spec.eval_every, "eval.samples": 0, "task.eval_split": spec.split,
                       "task.num_test": spec.num_eval, "task.num_validation": spec.num_eval,
                       "rollout.prompts_per_round": spec.prompts_per_round,
                       "rollout.samples_per_prompt": spec.samples_per_prompt,
                       "buffer.capacity": 5 * B, "optim.micro_batch_size": min(64, B), **spec.overrides}.items():
        set_field(tc, key, value)
    kwargs = {}
    if spec.problem is not None:  # one prompt, 16 answers per round, scored by mean@64 on it
        problem = Problem(**spec.problem)
        tc.eval.samples = 64
        kwargs = {"problems": [problem], "eval_problems": [problem],
                  "should_stop": lambda rec: rec["eval/mean@64"] >= spec.stop_at}
    if spec.measures:  # the final model is read back from its checkpoint
        tc.checkpoint_every = spec.rounds
    train(tc, **kwargs)
    measured = final_measures(spec.run_dir, spec.measures, spec.task, spec.split) if spec.measures else {}
    records = read_metrics(Path(spec.run_dir) / "metrics.jsonl")
    score = "eval/mean@64" if spec.problem is not None else "eval/accuracy"
    curve = [{"round": r["round"], "samples": r["samples"], "seconds": round(r["seconds"], 3),
              "accuracy": r[score]} for r in records if score in r]
    rounds = [r for r in records if "perf/generate_seconds" in r]
    shutil.rmtree(Path(spec.run_dir) / "checkpoints", ignore_errors=True)  # keep only the metrics
    return {"curve": curve, "generate_seconds": sum(r["perf/generate_seconds"] for r in rounds),
            "update_seconds": sum(r["perf/update_seconds"] for r in rounds), **measured}


def final_measures(run_dir, names, task: str, split: str, problems: int = 50, samples: int = 8) -> dict:
    """Measures of a run's final model. diversity: distinct answers among `samples` sampled (temperature 1)
    per problem, mean over `problems` of the evaluation split; held_add: greedy accuracy on 100 `add`
    validation problems (a capability the RL task does not train)."""
    import torch

    from reval.evaluate import evaluate
    from reval.rollout import generate

    model, tok = load_model(run_dir)
    torch.manual_seed(0)
    out = {}
    if "diversity" in names:
        probs = TASKS[task].split(split, problems, seed=EVAL_SEED)
        s = generate(model, tok, [format_prompt(tok, p.question) for p in probs], samples_per_prompt=samples,
                     max_new_tokens=TASKS[task].max_new_tokens)
        out["diversity"] = mean(len({tuple(r) for r in s.response_ids[i * samples:(i + 1) * samples]})
                                for i in range(len(probs)))
    if "held_add" in names:
        probs = TASKS["add"].split("validation", 100, seed=EVAL_SEED)
        out["held_add"] = evaluate(model, tok, [p.question for p in probs], [p.answer for p in probs], samples=0,
                                   max_new_tokens=TASKS["add"].max_new_tokens)["accuracy"]
    return out


def run_trl(spec: RunSpec) -> dict:
    """TRL's GRPOTrainer at our settings: same weights, prompts per round, reward and budget."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reval.evaluate import evaluate

    tc = TrainConfig()  # our defaults, so both sides read the same numbers
    tc.task.name = spec.task
    task = TASKS[spec.task]
    P, G, max_len = spec.prompts_per_round, spec.samples_per_prompt, tc.max_new_tokens
    model, tokenizer = load_model(default_model_path(spec.task))
    # The same prompts, in the same rounds, as our loop draws them (random.Random(seed).sample).
    train_set = task.split("train", tc.task.num_train, seed=spec.seed)
    rng = random.Random(spec.seed)
    rows = [p for _ in range(spec.rounds) for p in rng.sample(train_set, P)]
    dataset = Dataset.from_list([{"prompt": format_prompt(tokenizer, p.question), "answer": p.answer}
                                 for p in rows])
    eval_set = task.split(spec.split, spec.num_eval, seed=EVAL_SEED)
    eos = tokenizer.eos_token_id

    def correctness(prompts, completions, completion_ids, answer, **_):
        # ours gives reward 0 to answers cut at max_new_tokens without EOS; so does this
        rewards = correctness_reward(completions, answer)
        return [0.0 if len(ids) >= max_len and ids[-1] != eos else r for r, ids in zip(rewards, completion_ids)]

    micro = min(tc.optim.micro_batch_size, P * G)
    args = GRPOConfig(
        output_dir=spec.run_dir, seed=spec.seed, use_cpu=True, bf16=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        # one optimizer step per P x G answers, accumulated over micro-batches of 64 like ours
        per_device_train_batch_size=micro, gradient_accumulation_steps=P * G // micro,
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
            rnd = state.global_step // spec.k
            if state.global_step % spec.k == 0 and (rnd % spec.eval_every == 0 or rnd == spec.rounds):
                record(state.global_step)

    trainer.add_callback(EvalEveryRound())
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would drown the progress lines
    trainer.train()
    train_seconds = curve[-1]["seconds"]
    return {"curve": curve, "generate_seconds": timing["generate"],
            "update_seconds": train_seconds - timing["generate"]}


def worker_env(workers: int) -> dict:
    """The environment of a child process when `workers` run at once: one thread each on the two
    cores, no oversubscription."""
    env = dict(os.environ)
    if workers > 1:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def launch(specs: list[RunSpec], workers: int = 1, fresh: bool = False) -> list[dict]:
    """Run each spec in its own process, `workers` at a time; results in spec order.

    A spec whose result file exists is not run again (unless `fresh`), so a stage that was
    interrupted continues where it stopped."""
    env = worker_env(workers)

    def one(spec: RunSpec) -> None:
        if Path(spec.result).exists() and not fresh:
            return
        for path in (Path(spec.run_dir).parent, Path(spec.result).parent):
            path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(spec.run_dir, ignore_errors=True)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(asdict(spec), f)
        proc = subprocess.run([sys.executable, __file__, "child", "--spec", f.name], stderr=subprocess.PIPE,
                              text=True, env=env)
        Path(f.name).unlink()
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark run failed ({spec.method} seed {spec.seed} lr {spec.lr:g} K {spec.k}):"
                               f"\n{proc.stderr[-3000:]}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, specs))
    return [json.loads(Path(spec.result).read_text()) for spec in specs]


def make_spec(out: Path, study: str, method: str, seed: int, lr: float, k: int, rounds: int, split_name: str,
              num_eval: int, task: str, problem: Problem | None = None, samples_per_prompt: int = 8,
              overrides: dict | None = None, label: str | None = None, eval_every: int = 1,
              measures: tuple[str, ...] = ()) -> RunSpec:
    if problem is None:
        impl, algo = METHODS[method].impl, algo_of(method, k)
    else:
        impl, algo = "reval", ONE_PROMPT_METHODS[method][0]
    name = f"{study}/{label or method}-k{k}-lr{lr:g}-s{seed}"
    P = 128 // samples_per_prompt if problem is None else 1
    return RunSpec(method=method, impl=impl, algo=algo, k=k, lr=lr, seed=seed, rounds=rounds,
                   split=split_name, num_eval=num_eval, run_dir=str(out / "runs" / name),
                   result=str(out / "raw" / f"{name.replace('/', '__')}.json"), task=task,
                   prompts_per_round=P, samples_per_prompt=16 if problem is not None else samples_per_prompt,
                   problem=None if problem is None else asdict(problem),
                   stop_at=None if problem is None else 0.95, overrides=overrides or {}, label=label or method,
                   eval_every=eval_every, measures=tuple(measures))


# -- one-prompt problems ----------------------------------------------------------------------


def pick_problems(task: str, split_name: str, budget: Budget, targets: dict[str, float]) -> dict[str, dict]:
    """Problems whose starting-model mean accuracy (over `scan_samples`) is closest to each target."""
    import torch

    from reval.evaluate import evaluate

    model, tokenizer = load_model(default_model_path(task))
    torch.manual_seed(0)
    candidates = TASKS[task].split(split_name, budget.scan_problems, seed=EVAL_SEED)
    rates = []
    for p in candidates:
        res = evaluate(model, tokenizer, [p.question], [p.answer], samples=budget.scan_samples,
                       max_new_tokens=TASKS[task].max_new_tokens, greedy=False)
        rates.append(res[f"mean@{budget.scan_samples}"])
    picked, used = {}, set()
    for name, target in targets.items():
        i = min((i for i in range(len(candidates)) if i not in used), key=lambda i: abs(rates[i] - target))
        used.add(i)
        picked[name] = {"problem": asdict(candidates[i]), "start_accuracy": rates[i], "index": i}
    return picked


# -- stages -----------------------------------------------------------------------------------


def tune(out: Path, budget: Budget, task: str, workers: int, fresh: bool) -> dict:
    """The same lr grid for every method, crossed with its reuse-knob grid, on the validation
    split (seed 0); winner = best mean accuracy over the evaluations after rounds 1..R (ties: the
    cheaper K). Evaluated every `tune_eval_every` rounds on `tune_num_eval` problems, so the
    whole grid fits in an hour on 2 cores."""
    t0 = time.time()
    print(f"tuning, main setting ({task}, validation split, seed 0)")
    specs = [make_spec(out, "tune", m, 0, lr, k, budget.rounds, "validation", budget.tune_num_eval, task,
                       eval_every=budget.tune_eval_every)
             for m in budget.methods for k in budget.ks[m] for lr in budget.lrs]
    grid: dict[str, list[dict]] = {}
    for spec, result in zip(specs, launch(specs, workers, fresh)):
        accs = [p["accuracy"] for p in result["curve"][1:]]
        grid.setdefault(spec.method, []).append({"lr": spec.lr, "k": spec.k, "algo": spec.algo,
                                                 "mean_accuracy": round(mean(accs), 4), "final_accuracy": accs[-1]})
    winner = {m: max(rows, key=lambda r: (r["mean_accuracy"], -r["k"], -r["lr"])) for m, rows in grid.items()}
    result = {"tuned_on": "validation", "task": task, "rounds": budget.rounds, "seed": 0,
              "rule": f"highest mean greedy validation accuracy ({budget.tune_num_eval} problems, every "
                      f"{budget.tune_eval_every} rounds) over rounds 1..R; ties: smaller K, then smaller lr",
              "grid": grid, "winner": {m: {k: w[k] for k in ("lr", "k", "algo")} for m, w in winner.items()}}
    if budget.one_prompt_difficulties:
        result["one_prompt"] = tune_one_prompt(out, budget, task, workers, fresh)
    result["minutes"] = round((time.time() - t0) / 60, 1)
    (out / "tuning.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'tuning.json'}: " + ", ".join(f"{m} lr {w['lr']:g} K {w['k']}"
                                                        for m, w in result["winner"].items()))
    return result


# `add` has no tuning stage of its own here: ReVal's settings there were chosen on its
# validation split by benchmarks/tune_demo.sh (lr 3e-4, K = 2; README, "Choices").
ADD_REVAL = {"lr": 3e-4, "k": 2}


def claim_variants(tuning: dict | None, task: str, reset_every: int = 10) -> dict[str, tuple[str, int, float, dict]]:
    """The paper's ablations around the tuned ReVal: label -> (method, K, lr, config overrides).

    On `mul` each changes one thing against ReVal's tuned setting (the `main` study's row):
    the reuse K, the reward variant, beta, a reference reset every `reset_every` rounds; and TBRM with replay at the
    K that was best for it on validation (calibrated vs uncalibrated start with replay).
    On `add` (answers half as long) only beta varies, for beta against answer length."""
    if task == "add":
        lr, k = ADD_REVAL["lr"], ADD_REVAL["k"]
        return {f"reval_beta{b:g}": ("reval", k, lr, {"loss.beta": b}) for b in (0.02, 0.05, 0.2)}
    reval = tuning["winner"]["reval"]
    lr, k = reval["lr"], reval["k"]
    out = {f"reval_K{kk}": ("reval", kk, lr, {}) for kk in METHODS["reval"].ks if kk != k}
    out.update({
        "reval_group_mean": ("reval", k, lr, {"loss.reward_variant": "group_mean"}),
        "reval_plus_minus_one": ("reval", k, lr, {"loss.reward_variant": "plus_minus_one"}),
        "reval_beta0.02": ("reval", k, lr, {"loss.beta": 0.02}),
        "reval_beta0.2": ("reval", k, lr, {"loss.beta": 0.2}),
        f"reval_reset{reset_every}": ("reval", k, lr, {"loss.ref_reset_every": reset_every}),
    })
    replay = [r for r in tuning["grid"].get("tbrm", []) if r["k"] > 1]
    if replay:
        best = max(replay, key=lambda r: (r["mean_accuracy"], -r["k"]))
        out["tbrm_replay"] = ("tbrm", best["k"], best["lr"], {})
    return out


def why_specs(out: Path, budget: Budget, tuning: dict, task: str) -> list[RunSpec]:
    """On the validation split only (seed 0, the tuning's evaluation): what else could make
    ReVal need fewer answers? beta (answers here are twice as long as on `add`), the reward
    variant, a reference reset, and the buffer size, each changed alone from its tuned setting."""
    variants = {label: v for label, v in claim_variants(tuning, task).items()
                if not label.startswith(("reval_K", "tbrm"))}
    lr, k = tuning["winner"]["reval"]["lr"], tuning["winner"]["reval"]["k"]
    variants["reval_buffer10"] = ("reval", k, lr, {"buffer.capacity": 10 * 128})  # 10 rounds instead of 5
    variants["reval_buffer2"] = ("reval", k, lr, {"buffer.capacity": 2 * 128})
    return [make_spec(out, "why", method, 0, lr_, k_, budget.rounds, "validation", budget.tune_num_eval, task,
                      overrides=overrides, label=label, eval_every=budget.tune_eval_every)
            for label, (method, k_, lr_, overrides) in list(variants.items())[:budget.variants]]


def claim_specs(out: Path, budget: Budget, tuning: dict | None, task: str, rounds: int) -> list[RunSpec]:
    return [make_spec(out, "claims", method, seed, lr, k, rounds, "test", budget.num_eval, task,
                      overrides=overrides, label=label, eval_every=budget.claim_eval_every)
            for label, (method, k, lr, overrides) in list(claim_variants(tuning, task, max(1, rounds // 3)).items())[
                :budget.variants]
            for seed in budget.claim_seeds]


def tune_one_prompt(out: Path, budget: Budget, task: str, workers: int, fresh: bool) -> dict:
    print("tuning, one-prompt setting (a medium validation problem, seed 0)")
    problem = pick_problems(task, "validation", budget, {"medium": DIFFICULTY["medium"]})["medium"]
    specs = [make_spec(out, "tune_one_prompt", m, 0, lr, ONE_PROMPT_METHODS[m][1], budget.one_prompt_rounds,
                       "validation", 1, task, problem=Problem(**problem["problem"]))
             for m in budget.one_prompt_methods for lr in budget.one_prompt_lrs]
    grid: dict[str, dict[str, dict]] = {}
    for spec, result in zip(specs, launch(specs, workers, fresh)):
        grid.setdefault(spec.method, {})[f"{spec.lr:g}"] = {
            "rounds_to_95": rounds_to(result["curve"], 0.95),
            "mean_score": round(mean(p["accuracy"] for p in result["curve"][1:]), 4)}
    return {"problem": problem, "grid": grid,
            "winner": {m: float(min(g, key=lambda lr: (g[lr]["rounds_to_95"] or 10**9, -g[lr]["mean_score"])))
                       for m, g in grid.items()}}


def run(out: Path, budget: Budget, tuning: dict, task: str, studies: tuple[str, ...], workers: int,
        fresh: bool) -> None:
    t0 = time.time()
    win = tuning["winner"] if tuning else {}
    specs = []
    if "main" in studies:
        print(f"main: {budget.rounds} rounds x 128 answers, test split, seeds {list(budget.seeds)}")
        specs += [make_spec(out, "main", m, seed, win[m]["lr"], win[m]["k"], budget.rounds, "test",
                            budget.num_eval, task) for seed in budget.seeds for m in budget.methods]
    if "n1" in studies:
        print(f"n1: one answer per prompt, 128 prompts per round, seeds {list(budget.n1_seeds)}")
        specs += [make_spec(out, "n1", m, seed, win[m]["lr"], win[m]["k"], budget.rounds, "test",
                            budget.num_eval, task, samples_per_prompt=1)
                  for seed in budget.n1_seeds for m in budget.n1_methods]
    launch(specs, workers, fresh)
    if "why" in studies:
        specs = why_specs(out, budget, tuning, task)
        print(f"why: {len(specs)} variants of the tuned ReVal on the validation split (seed 0)")
        launch(specs, workers, fresh)
    if "claims" in studies:
        specs = claim_specs(out, budget, tuning, task, budget.claim_rounds.get(task, budget.rounds))
        print(f"claims: {len(specs)} runs of the paper's ablations, test split, seeds {list(budget.claim_seeds)}")
        launch(specs, workers, fresh)
    if "one_prompt" in studies and tuning and "one_prompt" in tuning:
        print("one_prompt: single test problems of three difficulties")
        picked = pick_problems(task, "test", budget, {d: DIFFICULTY[d] for d in budget.one_prompt_difficulties})
        (out / "one_prompt_problems.json").write_text(json.dumps(picked, indent=2) + "\n")
        lr_one = tuning["one_prompt"]["winner"]
        launch([make_spec(out, f"one_prompt_{name}", m, seed, lr_one[m], ONE_PROMPT_METHODS[m][1],
                          budget.one_prompt_rounds, "test", 1, task, problem=Problem(**info["problem"]))
                for name, info in picked.items() for seed in budget.one_prompt_seeds
                for m in budget.one_prompt_methods], workers, fresh)
    (out / "run_minutes.json").write_text(json.dumps({"minutes": round((time.time() - t0) / 60, 1)}) + "\n")
    report(out)


# -- summary and plots ------------------------------------------------------------------------


def rounds_to(curve: list[dict], target: float) -> int | None:
    return next((p["round"] for p in curve if p["accuracy"] >= target), None)


def first_reaching(curve: list[dict], target: float, key: str) -> float | None:
    return next((p[key] for p in curve if p["accuracy"] >= target), None)


def load_raw(out: Path, study: str) -> dict[str, list[dict]]:
    """method -> results sorted by seed."""
    runs: dict[str, list[dict]] = {}
    for path in sorted((out / "raw").glob(f"{study}__*.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["spec"].get("label") or r["spec"]["method"], []).append(r)
    for v in runs.values():
        v.sort(key=lambda r: r["spec"]["seed"])
    return runs


def ratio(numerators: list, denominators: list) -> float | None:
    """Mean over seeds of a / mean of b; None if either never reached the target in some seed."""
    if None in numerators or None in denominators or not numerators:
        return None
    return round(mean(numerators) / mean(denominators), 2)


def ratio_spread(numerators: list, denominators: list, never: float, n_boot: int = 2000) -> dict:
    """The ratio of mean answers (or seconds) to target, with a never-reached seed counted as
    `never` (so the ratio is then a bound), the per-seed ratios' min-max (seeds paired) and a
    90% bootstrap interval over seeds."""
    a = [never if x is None else x for x in numerators]
    b = [never if x is None else x for x in denominators]
    rng = random.Random(0)
    boots = []
    for _ in range(n_boot):
        idx = [rng.randrange(len(a)) for _ in a]
        boots.append(mean(a[i] for i in idx) / mean(b[i] for i in idx))
    boots.sort()
    per_seed = [x / y for x, y in zip(a, b)]
    return {"ratio": round(mean(a) / mean(b), 2), "per_seed_min": round(min(per_seed), 2),
            "per_seed_max": round(max(per_seed), 2),
            "bootstrap_90": [round(boots[int(0.05 * n_boot)], 2), round(boots[int(0.95 * n_boot) - 1], 2)],
            "censored": None in numerators or None in denominators}


def _paired(runs: dict[str, list[dict]], per: dict[str, list], m: str, ref: str) -> tuple[list, list]:
    """`per[m]` and `per[ref]` on the seeds both have (a stage still running has fewer)."""
    seeds = {name: [r["spec"]["seed"] for r in runs[name]] for name in (m, ref)}
    common = [seed for seed in seeds[m] if seed in seeds[ref]]
    return ([per[m][seeds[m].index(seed)] for seed in common],
            [per[ref][seeds[ref].index(seed)] for seed in common])


def _main_summary(main: dict[str, list[dict]], tuning: dict | None) -> dict:
    finals = {m: [r["curve"][-1]["accuracy"] for r in rs] for m, rs in main.items()}
    best_grpo = max((m for m in GRPO_VARIANTS if m in finals), key=lambda m: mean(finals[m]))
    target = round(0.95 * mean(finals[best_grpo]), 4)
    per = {key: {m: [first_reaching(r["curve"], target, key) for r in rs] for m, rs in main.items()}
           for key in ("samples", "seconds")}
    budget_answers = next(iter(main.values()))[0]["curve"][-1]["samples"]
    never_seconds = max(r["curve"][-1]["seconds"] for rs in main.values() for r in rs)
    spec = {m: rs[0]["spec"] for m, rs in main.items()}
    return {
        "target_accuracy": target,
        "target_rule": f"0.95 x the mean final test accuracy of the best GRPO variant ({best_grpo})",
        "tuned_on": tuning.get("tuned_on", "validation") if tuning else "validation",
        "seeds": [r["spec"]["seed"] for r in next(iter(main.values()))],
        "budget_answers": budget_answers,
        "samples_to_target": per["samples"],
        "seconds_to_target": per["seconds"],
        "final_accuracy": finals,
        "final_accuracy_mean": {m: round(mean(v), 4) for m, v in finals.items()},
        "lr": {m: s["lr"] for m, s in spec.items()},
        "K": {m: s["k"] for m, s in spec.items()},
        "algo": {m: s["algo"] for m, s in spec.items()},
        "generate_seconds": {m: [round(r["generate_seconds"], 1) for r in rs] for m, rs in main.items()},
        "update_seconds": {m: [round(r["update_seconds"], 1) for r in rs] for m, rs in main.items()},
        "peak_rss_mb": {m: [round(r["peak_rss_mb"]) for r in rs] for m, rs in main.items()},
        # never reached = one round past the budget (answers) or the slowest run's seconds
        "answers_ratio_vs_reval": {m: ratio_spread(*_paired(main, per["samples"], m, "reval"),
                                                   budget_answers + 128)
                                   for m in main if m != "reval" and "reval" in main},
        "seconds_ratio_vs_reval": {m: ratio_spread(*_paired(main, per["seconds"], m, "reval"), never_seconds)
                                   for m in main if m != "reval" and "reval" in main},
    }


def _n1_summary(runs: dict[str, list[dict]]) -> dict:
    finals = {m: [r["curve"][-1]["accuracy"] for r in rs] for m, rs in runs.items()}
    target = round(0.95 * mean(finals["grpo"]), 4) if "grpo" in finals else None
    rounds = {m: [rounds_to(r["curve"], target) for r in rs] for m, rs in runs.items()}
    seconds = {m: [first_reaching(r["curve"], target, "seconds") for r in rs] for m, rs in runs.items()}
    n = max(len(r["curve"]) for rs in runs.values() for r in rs)
    out = {"target_accuracy": target, "target_rule": "0.95 x the mean final test accuracy of GRPO at N = 1",
           "answers_per_round": 128, "rounds_to_target": rounds, "seconds_to_target": seconds,
           "final_accuracy": finals, "K": {m: rs[0]["spec"]["k"] for m, rs in runs.items()},
           "lr": {m: rs[0]["spec"]["lr"] for m, rs in runs.items()}}
    if "grpo" in runs and "reval" in runs:
        out["grpo_over_reval_rounds"] = ratio_spread(*_paired(runs, rounds, "grpo", "reval"), n)
        out["grpo_over_reval_seconds"] = ratio_spread(
            *_paired(runs, seconds, "grpo", "reval"), max(r["curve"][-1]["seconds"] for rs in runs.values() for r in rs))
    return out


def _claims_summary(claims: dict[str, list[dict]], main: dict[str, list[dict]], target: float | None) -> dict:
    """Each ablation next to ReVal's tuned row on the same seeds (when there is a main study,
    its curves taken at the ablations' evaluated rounds): final accuracy, mean accuracy over rounds 1..R,
    answers to the main study's target."""
    seeds = sorted({r["spec"]["seed"] for rs in claims.values() for r in rs})
    evaluated = {p["round"] for rs in claims.values() for r in rs for p in r["curve"]}  # the same rounds
    tuned = {"reval (tuned)": [{**r, "curve": [p for p in r["curve"] if p["round"] in evaluated]}
                               for r in main["reval"] if r["spec"]["seed"] in seeds]} if "reval" in main else {}
    rows = {**tuned, **claims}
    return {label: {"seeds": [r["spec"]["seed"] for r in rs], "K": rs[0]["spec"]["k"], "lr": rs[0]["spec"]["lr"],
                    "algo": rs[0]["spec"]["algo"], "overrides": rs[0]["spec"].get("overrides", {}),
                    "final_accuracy": [r["curve"][-1]["accuracy"] for r in rs],
                    "mean_accuracy": [round(mean(p["accuracy"] for p in r["curve"][1:]), 4) for r in rs],
                    "samples_to_target": ([first_reaching(r["curve"], target, "samples") for r in rs]
                                          if target else None),  # None: no main study, no target
                    "train_seconds": [round(r["curve"][-1]["seconds"], 1) for r in rs]}
            for label, rs in rows.items()}


def summarise(out: Path) -> dict:
    tuning_file = out / "tuning.json"
    tuning = json.loads(tuning_file.read_text()) if tuning_file.exists() else None
    summary: dict = {}
    main = load_raw(out, "main")
    if main:
        summary.update(_main_summary(main, tuning))
    if tuning:
        summary["tuning_winners"] = tuning["winner"]
    n1 = load_raw(out, "n1")
    if n1:
        summary["n1"] = _n1_summary(n1)
    why = load_raw(out, "why")
    if why and tuning:
        best = tuning["winner"]["reval"]
        tuned = next(r for r in tuning["grid"]["reval"] if r["lr"] == best["lr"] and r["k"] == best["k"])
        summary["why"] = {"split": "validation", "seed": 0, "reval (tuned)": tuned["mean_accuracy"],
                          **{label: {"mean_accuracy": round(mean(p["accuracy"] for p in r["curve"][1:]), 4),
                                     "final_accuracy": r["curve"][-1]["accuracy"],
                                     "overrides": r["spec"].get("overrides", {})}
                             for label, (r,) in why.items()}}
    claims = load_raw(out, "claims")
    if claims:
        summary["claims"] = _claims_summary(claims, main, summary.get("target_accuracy"))
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
    (out / "summary.md").write_text(markdown(summary))
    plot(out, summary)
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(markdown(summary)))
    print(f"wrote {out / 'summary.json'}, summary.md and the plots in {out}")
    return summary


def _cells(values: list, scale: float = 1.0, unit: str = "") -> str:
    return " / ".join("never" if v is None else f"{scale * v:.0f}{unit}" for v in values)


def _spread(r: dict) -> str:
    bound = ">= " if r["censored"] else ""
    return (f"{bound}{r['ratio']:.2f}x (seeds {r['per_seed_min']:.2f}-{r['per_seed_max']:.2f}, "
            f"90% bootstrap {r['bootstrap_90'][0]:.2f}-{r['bootstrap_90'][1]:.2f})")


def markdown(summary: dict) -> str:
    """The summary's tables in Markdown (what the README quotes)."""
    lines: list[str] = []
    if "final_accuracy" in summary:
        lines += [f"Main study, test split, seeds {summary['seeds']}; target = {100 * summary['target_accuracy']:.1f}% "
                  f"({summary['target_rule']}); budget {summary['budget_answers']} answers.", "",
                  "| method | algo | lr | K | answers to target | seconds to target | final acc | mean final "
                  "| generate / update s | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m, finals in summary["final_accuracy"].items():
            lines.append(
                f"| {m} | {summary['algo'][m]} | {summary['lr'][m]:g} | {summary['K'][m]} "
                f"| {_cells(summary['samples_to_target'][m])} | {_cells(summary['seconds_to_target'][m])} "
                f"| {_cells(finals, 100, '%')} | {100 * summary['final_accuracy_mean'][m]:.1f}% "
                f"| {mean(summary['generate_seconds'][m]):.0f} / {mean(summary['update_seconds'][m]):.0f} "
                f"| {min(summary['peak_rss_mb'][m])}-{max(summary['peak_rss_mb'][m])} |")
        lines += ["", "Ratio to ReVal of the mean answers (seconds) to target, > 1: ReVal needs fewer "
                  "(a never-reached seed counts as one round past the budget, or the slowest run's seconds):", "",
                  "| method | answers ratio | seconds ratio |", "|---|---|---|"]
        for m, r in summary["answers_ratio_vs_reval"].items():
            lines.append(f"| {m} / reval | {_spread(r)} | {_spread(summary['seconds_ratio_vs_reval'][m])} |")
    if "n1" in summary:
        n1 = summary["n1"]
        lines += ["", f"N = 1 (128 prompts x 1 answer per round), target {100 * n1['target_accuracy']:.1f}% "
                  f"({n1['target_rule']}):", "",
                  "| method | K, lr | rounds to target | seconds to target | final acc |", "|---|---|---|---|---|"]
        for m, rounds in n1["rounds_to_target"].items():
            lines.append(f"| {m} | {n1['K'][m]}, {n1['lr'][m]:g} | {_cells(rounds)} "
                         f"| {_cells(n1['seconds_to_target'][m])} | {_cells(n1['final_accuracy'][m], 100, '%')} |")
        if "grpo_over_reval_rounds" in n1:
            lines += ["", f"GRPO / ReVal rounds to target: {_spread(n1['grpo_over_reval_rounds'])}; "
                      f"seconds: {_spread(n1['grpo_over_reval_seconds'])}"]
    if "why" in summary:
        why = summary["why"]
        lines += ["", "Why (validation, seed 0): ReVal's tuned setting with one change", "",
                  "| variant | change | mean acc, rounds 1..R | final acc |", "|---|---|---|---|",
                  f"| reval (tuned) | | {100 * why['reval (tuned)']:.1f}% | |"]
        for label, v in why.items():
            if isinstance(v, dict):
                change = ", ".join(f"{k} = {x}" for k, x in v["overrides"].items())
                lines.append(f"| {label} | {change} | {100 * v['mean_accuracy']:.1f}% | {100 * v['final_accuracy']:.1f}% |")
    if "claims" in summary:
        lines += ["", "Claims (test split): each variant against ReVal's tuned row on the same seeds and rounds", "",
                  "| variant | algo, K, lr | change | final acc | mean acc, rounds 1..R | answers to target "
                  "| train s |", "|---|---|---|---|---|---|---|"]
        for label, c in summary["claims"].items():
            change = ", ".join(f"{k} = {x}" for k, x in c["overrides"].items())
            lines.append(f"| {label} | {c['algo']}, {c['K']}, {c['lr']:g} | {change} "
                         f"| {_cells(c['final_accuracy'], 100, '%')} (mean {100 * mean(c['final_accuracy']):.1f}%) "
                         f"| {100 * mean(c['mean_accuracy']):.1f}% "
                         f"| {'-' if c['samples_to_target'] is None else _cells(c['samples_to_target'])} "
                         f"| {mean(c['train_seconds']):.0f} |")
    for name, res in summary.get("one_prompt", {}).items():
        lines += ["", f"One prompt, {name} ({100 * res['start_accuracy']:.0f}% at start): rounds to 95% "
                  + ", ".join(f"{m} {_cells(r)}" for m, r in res["rounds_to_95"].items())]
    return "\n".join(lines) + "\n"


def _curves(ax, runs: dict[str, list[dict]], xkey: str, labels: dict[str, str]) -> None:
    for method, rs in runs.items():
        n = min(len(r["curve"]) for r in rs)
        xs = [mean(r["curve"][i][xkey] for r in rs) for i in range(n)]
        accs = [[100 * r["curve"][i]["accuracy"] for r in rs] for i in range(n)]
        ax.plot(xs, [mean(a) for a in accs], marker="o", ms=2, label=f"{labels.get(method, method)} "
                                                                      f"(mean of {len(rs)})")
        ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs], alpha=0.15)


def plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = load_raw(out, "main")
    labels = {m: f"{summary['algo'][m]} lr {summary['lr'][m]:g} K {summary['K'][m]}" for m in main} if main else {}
    for xkey, xlabel, fname in (("samples", "answers generated", "accuracy_vs_answers.png"),
                                ("seconds", "training seconds (generation + updates, eval excluded)",
                                 "accuracy_vs_seconds.png")):
        if not main:
            break
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _curves(ax, main, xkey, {m: f"{m}: {lab}" for m, lab in labels.items()})
        ax.axhline(100 * summary["target_accuracy"], color="grey", ls="--", lw=1, label="target")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy, greedy (%)")
        ax.set_title("Mean over seeds, band = min..max (settings tuned on validation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
    tuning_file = out / "tuning.json"
    grid = json.loads(tuning_file.read_text()).get("grid") if tuning_file.exists() else None
    if grid:  # the replay study's main stage has winners from its own staged grid, not this one
        fig, axes = plt.subplots(1, len(grid), figsize=(3.2 * len(grid), 3.2), sharey=True)
        for ax, (method, rows) in zip(list(getattr(axes, "flat", [axes])), grid.items()):
            for lr in sorted({r["lr"] for r in rows}):
                pts = sorted((r["k"], 100 * r["mean_accuracy"]) for r in rows if r["lr"] == lr)
                ax.plot([k for k, _ in pts], [a for _, a in pts], marker="o", label=f"lr {lr:g}")
            ax.set_xscale("log", base=2)
            ax.set_title(method)
            ax.set_xlabel("K (reuse per round)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        list(getattr(axes, "flat", [axes]))[0].set_ylabel("mean validation accuracy, rounds 1..R (%)")
        fig.tight_layout()
        fig.savefig(out / "tuning.png", dpi=100)
        plt.close(fig)
    n1 = load_raw(out, "n1")
    if n1:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _curves(ax, n1, "samples", {})
        if summary["n1"]["target_accuracy"]:
            ax.axhline(100 * summary["n1"]["target_accuracy"], color="grey", ls="--", lw=1, label="target")
        ax.set_xlabel("answers generated (128 prompts x 1 answer per round)")
        ax.set_ylabel("test accuracy, greedy (%)")
        ax.set_title("One answer per prompt (N = 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "n1.png", dpi=100)
        plt.close(fig)


def main() -> None:
    cfg = tyro.cli(BenchConfig)
    if cfg.stage == "child":
        run_child(RunSpec(**json.loads(cfg.spec.read_text())))
        return
    budget = QUICK if cfg.quick else Budget()
    if cfg.rounds:
        budget.rounds = cfg.rounds
    out = cfg.out or (Path("runs/bench-quick") / cfg.task if cfg.quick else RESULTS / cfg.task)
    out.mkdir(parents=True, exist_ok=True)
    studies = cfg.studies
    if cfg.quick:  # the smoke test goes through every study
        studies = ("main", "n1", "why", "claims", *(("one_prompt",) if cfg.task == "add" else ()))
    if "one_prompt" not in studies:
        budget.one_prompt_difficulties = ()
    elif not budget.one_prompt_difficulties:
        budget.one_prompt_difficulties = tuple(DIFFICULTY)
    if cfg.stage in ("tune", "all"):
        tune(out, budget, cfg.task, cfg.workers, cfg.fresh)
    if cfg.stage in ("run", "all"):
        tuning_file = out / "tuning.json"
        if cfg.task == "add" and studies == ("claims",) and not tuning_file.exists():
            run(out, budget, None, cfg.task, studies, cfg.workers, cfg.fresh)  # uses ADD_REVAL
            return
        if not tuning_file.exists():
            raise SystemExit(f"{tuning_file} not found: run `python benchmarks/bench.py tune --task {cfg.task}"
                             f"{' --quick' if cfg.quick else ''}` first")
        run(out, budget, json.loads(tuning_file.read_text()), cfg.task, studies, cfg.workers, cfg.fresh)
    if cfg.stage == "report":
        report(out)


if __name__ == "__main__":
    main()
