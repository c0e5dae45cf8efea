"""Study: RL over latent actions (BWArea / CoLA, docs/latent.md) against RL over tokens, on `mul`.

    python benchmarks/latent_study.py build     # the latent-action model from the shipped warm start
    python benchmarks/latent_study.py tune      # lr per method and action space, validation, seed 0
    python benchmarks/latent_study.py run       # the winners, 3 seeds, test split, with the final measures
    python benchmarks/latent_study.py start     # the run stage's measures on the two models RL starts from
    python benchmarks/latent_study.py dirty     # BWArea's dirty-data claim: 4 pretrainings from scratch
    python benchmarks/latent_study.py edge      # the tune stage at lr 5e-5: is the low edge of the grid a limit?
    python benchmarks/latent_study.py report    # summary.json / summary.md from the raw results
    python benchmarks/latent_study.py all --quick   # every stage at smoke-test size, runs/latent-quick

Written before any of its results were seen; the same for every method and action space:

build  `reval pretrain --task mul --latent-codes 64` (world model and inverse dynamics 300 steps from
       the shipped `mul` warm start, then the policy 300 steps), seed 0.
tune   ReVal (K 8, a 5-round buffer: the main study's tuned reuse) and our GRPO (K 2, likewise), each over
       tokens (the shipped warm start) and over codes (the model `build` wrote), lr in {1e-4, 3e-4, 1e-3},
       24 rounds of 16 x 8 answers, greedy accuracy on 100 validation problems every 2 rounds; score =
       the mean over the evaluations after rounds 1..24; ties: the smaller lr.
       A token run identical to one the replay study's grid made (replay/raw/) is copied, not rerun.
run    each of the 4 winners on seeds 0, 1, 2, the test split (200 problems after every round), the same
       budget; then on the final model: diversity (distinct answers among 8 sampled per problem, 50 test
       problems) and the held capability (greedy accuracy on 100 `add` validation problems, as the issue
       asks; the `mul` warm start solves 0 of them (measured), so this can show a gain, not a loss).
start  diversity and held `add` accuracy of the two starting models (the token warm start, the latent
       model `build` wrote), measured as `run` measures its final models: what RL changed.
dirty  seed 0, from a fresh tiny Qwen2 each: the plain LM on clean and on 20%-corrupted solutions
       (750 steps of the warm start's recipe), and the latent-action model on each (750 world-model
       steps, then 750 policy steps); greedy accuracy and mean@8 on 500 validation problems. Two at a
       time on one thread each. (Planned at 1,500 steps, the shipped warm start's; cut to 750 before
       any of it ran, because a latent model from scratch measured about 2.5 CPU-s per world-model plus
       policy step here: 1,500 would take over an hour each. The clean LM is therefore retrained at
       750 steps, not the shipped warm start.)
edge   (added after the run stage, when every winner was at the grid's lowest lr) the tune stage's four
       settings at lr 5e-5, seed 0, validation, scored alike; reported beside the grid, the winners and
       the run stage stay as they are.

Results: benchmarks/results/latent/ (raw/ per run, summary.json: one value per seed for every method and
measure). Runs are bench.py's (`bench.launch`: a child process each, two at a time on one thread each, a
run whose result file exists is skipped).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from statistics import mean, median

sys.path.insert(0, str(Path(__file__).parent))
from bench import RESULTS, RunSpec, final_measures, launch, make_spec, worker_env  # noqa: E402
from offline_common import study_args  # noqa: E402

from reval.model import default_model_path  # noqa: E402

OUT = RESULTS / "latent"
LRS = (1e-4, 3e-4, 1e-3)
K = {"reval": 8, "grpo": 2}  # the main study's tuned reuse
SPACES = ("token", "latent")
SEEDS = (0, 1, 2)
MEASURES = ("diversity", "held_add")


def models(out: Path) -> Path:
    """Where the pretrained models go: never into the committed results (they are megabytes)."""
    return out / "models" if out.parts[0] == "runs" else Path("runs/latent/models")


def latent_dir(out: Path) -> Path:
    return models(out) / "latent-mul"


def build(out: Path, quick: bool) -> dict:
    """The latent-action model (`reval pretrain --latent-codes 64`), unless it exists."""
    path = latent_dir(out)
    if not (path / "latent.json").exists():
        steps = ["--steps", "4", "--policy-steps", "4", "--eval-problems", "8"] if quick else []
        subprocess.run([sys.executable, "-m", "reval.cli", "pretrain", "--task", "mul", "--latent-codes", "64",
                        "--out", str(path), *steps], check=True)
    report = json.loads((path / "pretrain.json").read_text())
    (out / "pretrain-latent.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _specs(out: Path, study: str, rows, quick: bool, split: str, num_eval: int, every: int, measures=()):
    rounds = 2 if quick else 24
    return [make_spec(out, study, method, seed, lr, K[method], rounds, split, 8 if quick else num_eval, "mul",
                      overrides={"model.path": str(latent_dir(out))} if space == "latent" else {},
                      label=f"{space}_{method}", eval_every=1 if quick else every, measures=measures)
            for method, space, seed, lr in rows]


def _sweep(out: Path, study: str, lrs, quick: bool):
    """Every method in every space at each of `lrs`, seed 0, scored on 100 validation problems every
    2 rounds (the tune stage, and the edge probe beside it)."""
    rows = [(m, sp, 0, lr) for m in K for sp in SPACES for lr in lrs]
    return _specs(out, study, rows, quick, "validation", 100, 2)


def score(result: dict) -> float:
    return round(mean(p["accuracy"] for p in result["curve"][1:]), 4)


NAMES = ("label", "run_dir", "result")  # what differs between two runs of one setting in two studies


def reuse_identical(specs, done: Path) -> list[str]:
    """Copy the result of a finished run in `done` (another study's raw/) whose spec equals one of
    `specs` in everything but its names, so the same training is not run twice; returns the copies."""
    defaults = {f.name: f.default for f in fields(RunSpec) if f.default is not MISSING}  # fields added later
    finished = {}
    for path in sorted(done.glob("*.json")):
        spec = defaults | json.loads(path.read_text()).get("spec", {})
        finished[json.dumps({k: v for k, v in spec.items() if k not in NAMES}, sort_keys=True)] = path
    copied = []
    for spec in specs:
        key = json.dumps({k: v for k, v in asdict(spec).items() if k not in NAMES}, sort_keys=True)
        if key in finished and not Path(spec.result).exists():
            res = json.loads(finished[key].read_text())
            res["spec"] = asdict(spec) | {"reused_from": str(finished[key])}
            Path(spec.result).parent.mkdir(parents=True, exist_ok=True)
            Path(spec.result).write_text(json.dumps(res, indent=2) + "\n")
            copied.append(spec.result)
    return copied


def tune(out: Path, workers: int, fresh: bool, quick: bool) -> dict:
    specs = _sweep(out, "tune", LRS[1:2] if quick else LRS, quick)
    if not fresh:  # token runs at lr 1e-4 and 3e-4 are the replay study's grid (stage A) exactly
        for path in reuse_identical(specs, RESULTS / "replay" / "raw"):
            print(f"{path}: the identical run of the replay study, reused")
    results = launch(specs, workers, fresh)
    winners = {}
    for spec, res in zip(specs, results):
        key, s = spec.label, score(res)
        if key not in winners or s > winners[key]["score"]:  # ties keep the smaller lr (LRS ascends)
            winners[key] = {"lr": spec.lr, "k": spec.k, "score": s}
    (out / "tuning.json").write_text(json.dumps({"split": "validation", "winners": winners}, indent=2) + "\n")
    return winners


EDGE_LR = 5e-5


def edge(out: Path, workers: int, fresh: bool, quick: bool) -> dict:
    """The tune stage at EDGE_LR; edge.json: each setting's score there against its winner's."""
    winners = json.loads((out / "tuning.json").read_text())["winners"]
    specs = _sweep(out, "edge", (EDGE_LR,), quick)
    results = launch(specs, workers, fresh)
    res = {spec.label: {"lr": EDGE_LR, "score": score(r), "winner_lr": winners[spec.label]["lr"],
                        "winner_score": winners[spec.label]["score"]} for spec, r in zip(specs, results)}
    (out / "edge.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def run(out: Path, workers: int, fresh: bool, quick: bool) -> list[dict]:
    winners = json.loads((out / "tuning.json").read_text())["winners"]
    rows = [(label.split("_", 1)[1], label.split("_", 1)[0], seed, w["lr"])
            for label, w in winners.items() for seed in ((0,) if quick else SEEDS)]
    return launch(_specs(out, "run", rows, quick, "test", 200, 1, MEASURES), workers, fresh)


def start(out: Path) -> dict:
    """`run`'s final measures (diversity, held `add`) on the models RL starts from; start.json."""
    res = {space: final_measures(path, MEASURES, "mul", "test")
           for space, path in (("token", default_model_path("mul")), ("latent", latent_dir(out)))}
    (out / "start.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


DIRTY_STEPS = 750  # each pretraining stage (the docstring says why not 1,500)
DIRTY = {  # name: (latent codes, corrupt share)
    "lm_clean": (0, 0.0), "lm_dirty": (0, 0.2), "latent_clean": (64, 0.0), "latent_dirty": (64, 0.2)}


def dirty(out: Path, quick: bool, workers: int = 2) -> dict:
    """Four pretrainings from scratch, seed 0, `workers` at a time; each one's pretrain.json
    (a pretraining whose pretrain.json exists is skipped)."""
    steps = "4" if quick else str(DIRTY_STEPS)
    env = worker_env(workers)

    def one(name: str) -> dict:
        codes, share = DIRTY[name]
        path = models(out) / name
        if not (path / "pretrain.json").exists():
            latent = ["--latent-codes", str(codes), "--latent-from", "fresh", "--policy-steps", steps] if codes else []
            subprocess.run([sys.executable, "-m", "reval.cli", "pretrain", "--task", "mul", "--steps", steps,
                            "--corrupt", str(share), "--out", str(path), *latent,
                            *(["--eval-problems", "8"] if quick else [])], check=True, env=env)
        return json.loads((path / "pretrain.json").read_text())

    with ThreadPoolExecutor(max_workers=workers) as pool:
        reports = dict(zip(DIRTY, pool.map(one, DIRTY)))
    summary = {name: {k: r[k] for k in ("accuracy", "mean@8", "seconds")} | (
        {"reconstruction": r["reconstruction"]} if "reconstruction" in r else {}) | {"steps": r["config"]["steps"]}
        for name, r in reports.items()}
    (out / "dirty.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def report(out: Path) -> dict:
    """summary.json: per method and action space, one value per seed of every measure."""
    summary: dict = {"split": "test", "seeds": list(SEEDS), "methods": {}}
    for path in sorted((out / "raw").glob("run__*.json")):
        res = json.loads(path.read_text())
        spec = res["spec"]
        m = summary["methods"].setdefault(spec["label"], {"lr": spec["lr"], "k": spec["k"], "per_seed": {}})
        curve = res["curve"]
        m["per_seed"][str(spec["seed"])] = {
            "start": curve[0]["accuracy"], "final_accuracy": curve[-1]["accuracy"], "mean_accuracy": score(res),
            "answers": curve[-1]["samples"], "seconds": curve[-1]["seconds"],
            "cpu_seconds": round(res["cpu_seconds"], 1), "generate_seconds": round(res["generate_seconds"], 1),
            "update_seconds": round(res["update_seconds"], 1),
            "accuracy_per_1k_answers": round(1000 * (curve[-1]["accuracy"] - curve[0]["accuracy"])
                                             / max(curve[-1]["samples"], 1), 4),
            "accuracy_per_minute": round(60 * (curve[-1]["accuracy"] - curve[0]["accuracy"])
                                         / max(curve[-1]["seconds"], 1e-9), 4),
            **{k: res[k] for k in MEASURES if k in res}}
    for name in ("tuning.json", "edge.json", "dirty.json", "pretrain-latent.json", "start.json"):
        if (out / name).exists():
            summary[name.removesuffix(".json").replace("-", "_")] = json.loads((out / name).read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    return summary


COLUMNS = (("start", "start acc %", 100), ("final_accuracy", "final acc %", 100),
           ("mean_accuracy", "mean acc % (rounds 1-24)", 100), ("seconds", "train s (wall)", 1),
           ("cpu_seconds", "process CPU s", 1),
           ("accuracy_per_1k_answers", "gain per 1k answers (pts)", 100),
           ("accuracy_per_minute", "gain per train min (pts)", 100), ("diversity", "distinct of 8", 1),
           ("held_add", "held add %", 100))


def markdown(summary: dict) -> str:
    """One row per method and action space: the median over seeds, [min, max]."""
    lines = ["| method | lr | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for label, m in summary["methods"].items():
        cells = []
        for key, _, scale in COLUMNS:
            vals = sorted(scale * s[key] for s in m["per_seed"].values() if key in s)
            cells.append(f"{median(vals):.3g} [{vals[0]:.3g}, {vals[-1]:.3g}]" if vals else "-")
        lines.append(f"| {label} | {m['lr']:g} | " + " | ".join(cells) + " |")
    seeds = ", ".join(str(s) for s in summary["seeds"])
    return (f"# Latent study: {summary['split']} split, seeds {seeds}; median [min, max] over seeds\n\n"
            + "\n".join(lines) + "\n")


def main() -> None:
    stages = ("build", "tune", "run", "start", "edge", "dirty", "report", "all")
    args, out, _ = study_args(__doc__, "latent", OUT, stages)
    if args.stage in ("build", "all"):
        build(out, args.quick)
    if args.stage in ("tune", "all"):
        tune(out, args.workers, args.fresh, args.quick)
    if args.stage in ("run", "all"):
        run(out, args.workers, args.fresh, args.quick)
    if args.stage in ("start", "all"):
        start(out)
    if args.stage in ("edge", "all"):
        edge(out, args.workers, args.fresh, args.quick)
    if args.stage in ("dirty", "all"):
        dirty(out, args.quick, args.workers)
    if args.stage in ("report", "all"):
        print(json.dumps(report(out), indent=2)[:3000])


if __name__ == "__main__":
    main()
