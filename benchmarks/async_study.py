"""The asynchronous actor-learner on `mul`: how much staleness each method takes, what the
asynchronous schedule saves on 2 cores, and what it would hide on a GPU.

    python benchmarks/async_study.py staleness     # ~1 h on 2 cores -> benchmarks/results/mul/async/raw
    python benchmarks/async_study.py wall-clock    # ~25 min, alone on the machine
    python benchmarks/async_study.py report        # summary.json, summary.md, plots
    python benchmarks/async_study.py all --quick   # every stage at smoke-test size

Studies (test split, seeds 0-2; every hyperparameter is the validation winner of
`benchmarks/bench.py tune --task mul`, benchmarks/results/mul/tuning.json: lr 1e-4 for both,
K = 8 for ReVal, K = 2 for GRPO; nothing here is tuned on the test split):

  staleness   every round samples with the policy's weights from exactly L updates earlier
              (`rollout.lag L`, L = 0, 1, 2, 4, 8): ReVal, GRPO with its sampler correction
              (`loss.sampler_weight_cap`, default 2) and GRPO without it (cap 0: the stale
              answers are treated as the policy's own). At L = 0 the sampler is the policy and
              the two GRPOs are the same run. 12 rounds of 16 x 8 answers, greedy accuracy on
              the 200 test problems every 2 rounds. Lag counts updates (policy versions), as the
              peers' staleness bounds do: with K = 8, L = 8 is one round behind for ReVal; with
              K = 2 it is four rounds behind for GRPO.
  wall-clock  ReVal at its tuned setting, synchronous (one process, one thread) vs asynchronous
              (actor and learner one thread each), 12 rounds, one run at a time; then `sync2`,
              the synchronous loop on 2 torch threads (the same two cores as async). Accuracy comes
              afterwards from the checkpoints of every 2nd round, so evaluation never
              overlaps training: seconds are training seconds only, in both schedules.

The target, fixed before these runs: 0.9 x ReVal's mean final test accuracy after 12 rounds
in the claims study of benchmarks/results/mul (73.2%), i.e. 65.9%.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Literal

import tyro

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402  (the benchmark's launcher, run specs and result format)

OUT = bench.RESULTS / "mul" / "async"
TARGET = round(0.9 * 0.732, 3)
LAGS = (0, 1, 2, 4, 8)
# study name -> (bench method, extra config)
METHODS = {"reval": ("reval", {}), "grpo": ("grpo", {}), "grpo_nocorr": ("grpo", {"loss.sampler_weight_cap": 0})}


@dataclass
class Budget:
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 12
    num_eval: int = 200
    eval_every: int = 2
    lags: tuple[int, ...] = LAGS


QUICK = Budget(seeds=(0,), rounds=2, num_eval=20, eval_every=1, lags=(0, 2))


@dataclass
class StudyConfig:
    stage: tyro.conf.Positional[Literal["staleness", "wall-clock", "report", "all", "wall-child"]]
    """staleness / wall-clock: run that study (skips runs already done); report: summary and plots."""
    quick: bool = False
    """Smoke-test sizes; writes to runs/async-quick."""
    workers: int = 2
    """staleness: runs at once (one thread each)."""
    out: Path | None = None
    """Results directory; default benchmarks/results/mul/async."""
    fresh: bool = False
    """Re-run runs whose result file exists."""
    spec: Path | None = None
    """(internal) the run spec of a wall-child stage."""


def tuned() -> dict:
    return json.loads((bench.RESULTS / "mul" / "tuning.json").read_text())["winner"]


# -- staleness --------------------------------------------------------------------------------


def staleness_specs(out: Path, budget: Budget) -> list[bench.RunSpec]:
    winners, specs = tuned(), []
    for name, (method, extra) in METHODS.items():
        w = winners[method]
        for lag in budget.lags:
            if lag == 0 and name == "grpo_nocorr":
                continue  # the sampler is the policy: the same run as grpo at lag 0
            for seed in budget.seeds:
                specs.append(bench.make_spec(out, "staleness", method, seed, w["lr"], w["k"], budget.rounds, "test",
                                             budget.num_eval, "mul", overrides={"rollout.lag": lag, **extra},
                                             label=f"{name}_lag{lag}", eval_every=budget.eval_every))
    return specs


# -- wall clock -------------------------------------------------------------------------------


@dataclass
class WallSpec:
    mode: str  # "sync" | "async"
    seed: int
    rounds: int
    num_eval: int
    eval_every: int
    run_dir: str
    result: str
    overrides: dict = field(default_factory=dict)


def wall_child(spec: WallSpec) -> None:
    """One run, then the accuracy of each of its checkpoints (after training: never timed)."""
    import torch

    from reval.config import TrainConfig
    from reval.demo import set_field
    from reval.evaluate import evaluate
    from reval.metrics import read_metrics
    from reval.model import load_model
    from reval.tasks import TASKS
    from reval.tasks.arithmetic import EVAL_SEED
    from reval.train import train

    w = tuned()["reval"]
    tc = TrainConfig(algo="reval", rounds=spec.rounds, seed=spec.seed, out=Path(spec.run_dir), progress=False,
                     checkpoint_every=spec.eval_every, keep_checkpoints=spec.rounds, report_to="none")
    for key, value in {"task.name": "mul", "buffer.updates_per_round": w["k"], "optim.lr": w["lr"],
                       "eval.every": 0, "eval.samples": 0, "rollout.prompts_per_round": 16,
                       "rollout.samples_per_prompt": 8, "buffer.capacity": 5 * 128, "optim.micro_batch_size": 64,
                       "schedule.mode": "sync" if spec.mode == "sync2" else spec.mode, **spec.overrides}.items():
        set_field(tc, key, value)
    t0 = time.time()
    train(tc)
    wall = time.time() - t0
    records = [r for r in read_metrics(Path(spec.run_dir) / "metrics.jsonl") if "perf/update_seconds" in r]
    eval_set = TASKS["mul"].split("test", spec.num_eval, seed=EVAL_SEED)
    torch.set_num_threads(1)
    curve = []
    for rec in records:
        ckpt = Path(spec.run_dir) / "checkpoints" / f"round-{rec['round']:06d}"
        if not ckpt.exists():
            continue
        model, tokenizer = load_model(ckpt / "model")
        acc = evaluate(model, tokenizer, [p.question for p in eval_set], [p.answer for p in eval_set],
                       max_new_tokens=tc.max_new_tokens)["accuracy"]
        curve.append({"round": rec["round"], "samples": rec["samples"], "seconds": round(rec["seconds"], 3),
                      "accuracy": acc})
    gen = sum(r["perf/generate_seconds"] for r in records)
    upd = sum(r["perf/update_seconds"] for r in records)
    idle = {"learner_wait_seconds": sum(r.get("perf/learner_wait_seconds", 0.0) for r in records),
            "actor_wait_seconds": sum(r.get("perf/actor_wait_seconds", 0.0) for r in records)}
    shutil.rmtree(Path(spec.run_dir) / "checkpoints", ignore_errors=True)
    Path(spec.result).write_text(json.dumps({
        "curve": curve, "train_seconds": records[-1]["seconds"], "wall_seconds": round(wall, 1),
        "generate_seconds": gen, "update_seconds": upd, **idle, "spec": asdict(spec)}) + "\n")
    print(f"  {spec.mode:5s} seed {spec.seed}: {records[-1]['seconds']:.0f} s training, final "
          f"{curve[-1]['accuracy'] if curve else float('nan'):.3f}", flush=True)


def wall_specs(out: Path, budget: Budget) -> list[WallSpec]:
    # interleaved: sync and async of a seed back to back, so that drift in the machine's load
    # falls on both schedules alike
    # sync2 (the synchronous loop given both cores, 2 torch threads) last: the baseline that uses
    # the same hardware as async, beyond the comparison the study asks for
    return [WallSpec(mode, seed, budget.rounds, budget.num_eval, budget.eval_every,
                     str(out / "runs" / f"wall-{mode}-s{seed}"), str(out / "raw" / f"wall__{mode}-s{seed}.json"))
            for modes in (("sync", "async"), ("sync2",)) for seed in budget.seeds for mode in modes]


def run_wall(specs: list[WallSpec], fresh: bool) -> None:
    """One run at a time: sync on one thread; async's actor and learner on one thread each."""
    for spec in specs:
        threads = "2" if spec.mode == "sync2" else "1"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if Path(spec.result).exists() and not fresh:
            continue
        Path(spec.result).parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(spec.run_dir, ignore_errors=True)
        spec_file = Path(spec.result).with_suffix(".spec.json")
        spec_file.write_text(json.dumps(asdict(spec)))
        proc = subprocess.run([sys.executable, __file__, "wall-child", "--spec", str(spec_file)], env=env,
                              stderr=subprocess.PIPE, text=True)
        spec_file.unlink()
        if proc.returncode != 0:
            raise RuntimeError(f"wall-clock run failed ({spec.mode} seed {spec.seed}):\n{proc.stderr[-3000:]}")


# -- report -----------------------------------------------------------------------------------

ANSWERS_PER_ROUND = 128


def answers_to_target(curve: list[dict]) -> int | None:
    return bench.first_reaching(curve, TARGET, "samples")


def _never_as(values: list, never: float) -> list[float]:
    return [never if v is None else v for v in values]


def staleness_summary(out: Path, budget: Budget) -> dict:
    """method -> lag -> per-seed final accuracy and answers to target (None: never reached)."""
    runs = bench.load_raw(out, "staleness")
    never = (budget.rounds + 1) * ANSWERS_PER_ROUND  # a never-reached seed counts one round past the budget
    table: dict = {}
    for name in METHODS:
        for lag in budget.lags:
            shared = "grpo" if (name, lag) == ("grpo_nocorr", 0) else None  # the same run (see staleness_specs)
            label = f"{shared or name}_lag{lag}"
            results = runs.get(label, [])
            if not results:
                continue
            final = [r["curve"][-1]["accuracy"] for r in results]
            answers = [answers_to_target(r["curve"]) for r in results]
            table.setdefault(name, {})[str(lag)] = {
                "seeds": [r["spec"]["seed"] for r in results], "final_accuracy": final,
                "answers_to_target": answers, "mean_final_accuracy": round(mean(final), 4),
                "mean_answers_to_target": round(mean(_never_as(answers, never)), 1),
                "reached": sum(a is not None for a in answers),
                "shared_with": shared}
    for name, lags in table.items():  # what the lag costs, against the method's own lag 0
        base = lags.get("0")
        for cell in lags.values():
            if base:
                cell["final_accuracy_change"] = round(cell["mean_final_accuracy"] - base["mean_final_accuracy"], 4)
    return table


def wall_summary(out: Path) -> dict:
    runs: dict[str, list[dict]] = {}
    for path in sorted((out / "raw").glob("wall__*.json")):
        if path.name.endswith(".spec.json"):
            continue  # a run in progress
        r = json.loads(path.read_text())
        runs.setdefault(r["spec"]["mode"], []).append(r)
    table = {}
    for mode, results in runs.items():
        results.sort(key=lambda r: r["spec"]["seed"])
        rows = []
        for r in results:
            t = r["train_seconds"]
            if mode != "async":  # one process takes turns: the learner idles while it generates, and back
                learner_idle, actor_idle = r["generate_seconds"] / t, r["update_seconds"] / t
            else:
                learner_idle, actor_idle = r["learner_wait_seconds"] / t, r["actor_wait_seconds"] / t
            rows.append({"seed": r["spec"]["seed"], "seconds_to_target": bench.first_reaching(r["curve"], TARGET,
                                                                                                 "seconds"),
                         "answers_to_target": answers_to_target(r["curve"]), "train_seconds": round(t, 1),
                         "final_accuracy": r["curve"][-1]["accuracy"], "learner_idle_share": round(learner_idle, 3),
                         "actor_idle_share": round(actor_idle, 3), "curve": r["curve"]})
        table[mode] = rows
    return table


def gpu_projection() -> dict:
    """A calculation, not a measurement: the share of a round the asynchronous schedule hides,
    max(G, K U) instead of G + K U, for the 1.5B preset (K = 2) and for K = 8."""
    smoke = json.loads((bench.RESULTS / "gpu_smoke_h100.json").read_text())
    row = next(r for r in smoke["runs"] if r["name"].startswith("Qwen2 0.3B random, 151k vocab, full FT"))
    gen_per_round = row["generate_seconds"] / row["rounds"]
    upd_per_update = row["update_seconds"] / row["updates"]
    splits = {"h100_smoke_0.3B": {"generate_s": round(gen_per_round, 2), "update_s": round(upd_per_update, 2),
                                  "source": "benchmarks/results/gpu_smoke_h100.json, 0.3B full FT, 16x8 answers "
                                            "of ~1018 tokens: per-round generation and per-update seconds"},
              "paper_n1": {"generate_s": 36.8, "update_s": 2.8,
                           "source": "the paper's N = 1 study: 36.8 s generation vs 2.8 s per update"}}
    out = {"label": "calculation from measured per-round costs, not a measurement of the asynchronous "
                    "schedule on a GPU; assumes the ratio of generation to update cost carries over to the "
                    "1.5B preset (both scale with the model) and a free weight push",
           "splits": splits, "hidden_share": {}}
    for name, split in splits.items():
        for k in (1, 2, 8):
            g, ku = split["generate_s"], k * split["update_s"]
            out["hidden_share"][f"{name}_K{k}"] = {
                "sync_round_s": round(g + ku, 2), "async_round_s": round(max(g, ku), 2),
                "hidden_share": round(min(g, ku) / (g + ku), 3)}
    return out


def report(out: Path, budget: Budget) -> dict:
    summary = {"target_accuracy": TARGET, "target_rule": "0.9 x ReVal's mean final test accuracy after 12 rounds "
               "in the claims study of benchmarks/results/mul (73.2%), fixed before these runs",
               "hyperparameters": {m: tuned()[m] for m in ("reval", "grpo")}, "budget": asdict(budget),
               "staleness": staleness_summary(out, budget), "wall_clock": wall_summary(out),
               "gpu_projection": gpu_projection()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    plot(out, summary)
    print(markdown(summary))
    return summary


def _cells(values, fmt) -> str:
    return " / ".join("never" if v is None else fmt(v) for v in values)


def markdown(s: dict) -> str:
    lines = [f"Asynchronous actor-learner on `mul` (test split; target {s['target_accuracy']:.1%}: "
             f"{s['target_rule']}).", "", "## Staleness: a fixed sampler lag of L updates", "",
             "| method | L | final accuracy per seed | mean | change vs L = 0 | answers to target per seed |",
             "|---|---|---|---|---|---|"]
    for name, lags in s["staleness"].items():
        for lag, c in lags.items():
            lines.append(f"| {name} | {lag} | {_cells(c['final_accuracy'], lambda v: f'{v:.1%}')} | "
                         f"{c['mean_final_accuracy']:.1%} | {c.get('final_accuracy_change', 0):+.1%} | "
                         f"{_cells(c['answers_to_target'], str)} |")
    lines += ["", "## Wall clock: ReVal, sync (1 thread) vs async (actor + learner, 1 thread each); sync2: 2 threads",
              "",
              "| schedule | seed | seconds to target | answers to target | training s | final acc | learner idle | "
              "actor idle |", "|---|---|---|---|---|---|---|---|"]
    for mode, rows in s["wall_clock"].items():
        for r in rows:
            lines.append(f"| {mode} | {r['seed']} | {_cells([r['seconds_to_target']], lambda v: f'{v:.0f}')} | "
                         f"{_cells([r['answers_to_target']], str)} | {r['train_seconds']:.0f} | "
                         f"{r['final_accuracy']:.1%} | {r['learner_idle_share']:.0%} | {r['actor_idle_share']:.0%} |")
    p = s["gpu_projection"]
    lines += ["", f"## GPU projection ({p['label']})", "", "| split | K | sync round s | async round s | hidden |",
              "|---|---|---|---|---|"]
    for key, v in p["hidden_share"].items():
        split, k = key.rsplit("_K", 1)
        lines.append(f"| {split} | {k} | {v['sync_round_s']} | {v['async_round_s']} | {v['hidden_share']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(out: Path, s: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, lags in s["staleness"].items():
        xs = [int(lag) for lag in lags]
        means = [c["mean_final_accuracy"] for c in lags.values()]
        lo = [m - min(c["final_accuracy"]) for m, c in zip(means, lags.values())]
        hi = [max(c["final_accuracy"]) - m for m, c in zip(means, lags.values())]
        axes[0].errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, label=name)
    axes[0].axhline(s["target_accuracy"], color="grey", ls=":", lw=1)
    axes[0].set(xlabel="sampler lag L (updates)", ylabel="final test accuracy (mean, seed range)",
                title="staleness", xticks=list(LAGS))
    axes[0].legend()
    for mode, rows in s["wall_clock"].items():
        for i, r in enumerate(rows):
            axes[1].plot([p["seconds"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]],
                         color={"sync": "C0", "async": "C1"}.get(mode, "C2"), alpha=0.8,
                         label=mode if i == 0 else None)
    axes[1].axhline(s["target_accuracy"], color="grey", ls=":", lw=1)
    axes[1].set(xlabel="training seconds (2 cores)", ylabel="test accuracy", title="ReVal: sync vs async")
    if s["wall_clock"]:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "async.png", dpi=110)
    plt.close(fig)




def main() -> None:
    cfg = tyro.cli(StudyConfig)
    if cfg.stage == "wall-child":
        wall_child(WallSpec(**json.loads(cfg.spec.read_text())))
        return
    budget = QUICK if cfg.quick else Budget()
    out = cfg.out or (Path("runs/async-quick") if cfg.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.stage in ("staleness", "all"):
        t0 = time.time()
        bench.launch(staleness_specs(out, budget), workers=cfg.workers, fresh=cfg.fresh)
        print(f"staleness: {(time.time() - t0) / 60:.1f} min")
    if cfg.stage in ("wall-clock", "all"):
        t0 = time.time()
        run_wall(wall_specs(out, budget), cfg.fresh)
        print(f"wall clock: {(time.time() - t0) / 60:.1f} min")
    if cfg.stage in ("report", "all"):
        report(out, budget)


if __name__ == "__main__":
    main()
