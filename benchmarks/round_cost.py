"""What one training round costs, phase by phase, for each method: this tree against another.

    git worktree add /tmp/reval-before 54cf9d0          # the code before the cheaper rounds
    OMP_NUM_THREADS=1 python benchmarks/round_cost.py --before /tmp/reval-before
    OMP_NUM_THREADS=1 python benchmarks/round_cost.py --quick     # smoke test, this tree only

Each measurement is a fresh child process that trains `rounds` rounds from the shipped
addition model (the defaults: 16 prompts x 8 answers, micro-batch 64) with evaluation
off, and charges the process CPU seconds (`time.process_time`, single-threaded) of each
round to its phases by wrapping functions that exist in both trees:

  generate     the rollout (`HFGenerator.generate`)
  reference    reference passes (`Reference.logprobs`), inside the updates
  forward      the policy's loss forward (`LogProbModule.forward`), inside the updates
  backward     the rest of the updates: backward, clipping, optimizer step
  old_logp     policy forwards outside the updates (GRPO's pi_old for K > 1)
  other        rewards, collation, bookkeeping

Variants (tree x method) are interleaved and repeated, and the median and range over
repeats are reported. The first round of each run is dropped (warm-up). A second part
measures rollout throughput: the library's sampler (shared prefill) against a bare
`model.generate(num_return_sequences=G)` on the same model and prompts. Results go to
benchmarks/results/round_cost.json.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).resolve().parent.parent
# method -> config overrides; K as the library defaults it (ReVal 2, GRPO 1) plus GRPO's reuse
METHODS = {
    "reval": {"algo": "reval", "k": 2},
    "grpo": {"algo": "grpo", "k": 1},
    "grpo_k2": {"algo": "grpo", "k": 2},
}
PHASES = ("generate", "reference", "forward", "backward", "old_logp", "other")


@dataclass
class Args:
    before: Path | None = None
    """Root of another checkout to compare with (e.g. a git worktree of an older commit)."""
    repeats: int = 3
    """Runs per variant (interleaved)."""
    rounds: int = 5
    """Rounds per run; the first is dropped."""
    task: str = "add"
    """Embedded task (this tree only; an older tree always runs the addition task)."""
    micro_batch: int = 64
    """optim.micro_batch_size."""
    out: Path = RESULTS / "round_cost.json"
    """Results file."""
    quick: bool = False
    """1 repeat, 2 rounds, this tree only, results to runs/round_cost_quick.json."""
    child: str | None = None
    """(internal) JSON spec of one measurement."""


def measure(spec: dict) -> dict:
    """Run in a child process: train `rounds` rounds, charging process CPU seconds to phases."""
    import torch

    torch.set_num_threads(1)
    import reval.distributed as distributed
    import reval.reference as reference
    import reval.loop.learner as learner
    import reval.rollout as rollout
    import reval.train as train_mod
    from reval.metrics import MetricsLogger
    from reval.config import TrainConfig
    from reval.tasks.arithmetic import split

    spent = dict.fromkeys(("generate", "reference", "forward", "update"), 0.0)
    rounds: list[dict] = []

    def timed(phase, fn):
        def wrapper(*a, **k):
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[phase] += time.process_time() - t0
        return wrapper

    rollout.HFGenerator.generate = timed("generate", rollout.HFGenerator.generate)
    reference.Reference.logprobs = timed("reference", reference.Reference.logprobs)
    distributed.LogProbModule.forward = timed("forward", distributed.LogProbModule.forward)
    update = learner.update

    def timed_update(*a, **k):  # policy forwards outside updates (GRPO's pi_old) are `old_logp`
        before = dict(spent)
        t0 = time.process_time()
        out = update(*a, **k)
        spent["update"] += time.process_time() - t0
        spent["forward_in_update"] = spent.get("forward_in_update", 0.0) + spent["forward"] - before["forward"]
        spent["reference_in_update"] = spent.get("reference_in_update", 0.0) + spent["reference"] - before["reference"]
        return out

    learner.update = timed_update  # the learner's module global: what `Learner.step` calls
    log = MetricsLogger.log
    last = {"cpu": 0.0}

    def on_log(self, record):  # one record per round (evaluations are skipped)
        if "rollout/reward_mean" in record:
            total = time.process_time() - last["cpu"]
            fwd, ref = spent.get("forward_in_update", 0.0), spent.get("reference_in_update", 0.0)
            row = {"generate": spent["generate"], "reference": spent["reference"], "forward": fwd,
                   "backward": spent["update"] - fwd - ref, "old_logp": spent["forward"] - fwd}
            row["other"] = total - sum(row.values()) - (spent["reference"] - ref)
            row["total"] = total
            rounds.append(row)
            for key in list(spent):
                spent[key] = 0.0
        log(self, record)
        last["cpu"] = time.process_time()

    MetricsLogger.log = on_log
    cfg = TrainConfig(algo=spec["algo"], rounds=spec["rounds"], out=Path(spec["run_dir"]), progress=False,
                      checkpoint_every=0)
    cfg.buffer.updates_per_round = spec["k"]
    cfg.optim.micro_batch_size = spec["micro_batch"]
    cfg.eval.every, cfg.eval.samples = 0, 0
    if spec["task"] != "add":
        cfg.task.name = spec["task"]
    last["cpu"] = time.process_time()
    train_mod.train(cfg, eval_problems=split("test", 1, seed=0))  # eval cost is not measured
    return {"rounds": rounds[1:]}


def rollout_throughput(repeats: int) -> dict:
    """Answer tokens per CPU second: the library's sampler vs a bare `model.generate`."""
    import torch

    torch.set_num_threads(1)
    from reval.model import default_model_path, format_prompt, load_model
    from reval.rollout import generate
    from reval.tasks import TASKS

    model, tok = load_model(default_model_path())
    model.eval()
    prompts = [format_prompt(tok, p.question) for p in TASKS["add"].split("train", 16)]
    G, max_new = 8, 48
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)

    def bare():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=max_new,
                             num_return_sequences=G, eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return int(sum(_answer_length(row, tok.eos_token_id) for row in new.tolist()))

    def library():
        s = generate(model, tok, prompts, samples_per_prompt=G, max_new_tokens=max_new)
        return sum(len(r) for r in s.response_ids)

    result = {"bare_generate": [], "reval_generate": []}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in (("bare_generate", bare), ("reval_generate", library)):
                torch.manual_seed(0)
                t0 = time.process_time()
                tokens = fn()
                result[name].append(tokens / (time.process_time() - t0))
    return {k: _stats(v) for k, v in result.items()}


def _answer_length(row: list[int], eos: int) -> int:
    return row.index(eos) + 1 if eos in row else len(row)


def _stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "n": len(values)}


def _commit(tree: Path) -> str:
    """The tree's commit (with "+ changes" when its work tree differs), else its path."""
    try:
        head = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(tree)
    return f"{head} + changes" if dirty else head


def main() -> None:
    args = tyro.cli(Args)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(rollout_throughput(spec["repeats"]) if spec.get("throughput") else measure(spec)))
        return
    if args.quick:
        args.repeats, args.rounds, args.before = 1, 2, None
        args.out = Path("runs/round_cost_quick.json")
    trees = {"after": HERE}
    if args.before is not None:
        trees = {"before": args.before.resolve(), "after": HERE}
    per_round: dict[str, dict[str, list[dict]]] = {}
    for rep in range(args.repeats):
        for method, m in METHODS.items():
            for tree, root in trees.items():  # interleaved: before / after of one method back to back
                spec = {**m, "rounds": args.rounds, "micro_batch": args.micro_batch, "task": args.task,
                        "run_dir": f"runs/round_cost/{tree}-{method}-{rep}"}
                if tree == "before" or args.task == "add":
                    spec["task"] = "add"
                shutil.rmtree(spec["run_dir"], ignore_errors=True)
                rows = _child(root, spec)["rounds"]
                shutil.rmtree(spec["run_dir"], ignore_errors=True)
                per_round.setdefault(tree, {}).setdefault(method, []).extend(rows)
                print(f"repeat {rep} {method:8s} {tree:6s}: {statistics.median(r['total'] for r in rows):.2f} "
                      "CPU s per round", flush=True)
    summary = {"unit": "process CPU seconds per round, single-threaded (median over rounds of all repeats, "
                       "[min, max])",
               "settings": {"task": args.task, "prompts_x_answers": "16 x 8", "micro_batch": args.micro_batch,
                            "rounds_per_run": args.rounds, "first_round_dropped": True, "repeats": args.repeats,
                            "trees": {k: _commit(v) for k, v in trees.items()}},
               "per_round": {tree: {method: {p: _stats([r[p] for r in rows]) for p in (*PHASES, "total")}
                                    for method, rows in methods.items()}
                             for tree, methods in per_round.items()}}
    if "before" in per_round:
        summary["after_over_before"] = {
            method: round(summary["per_round"]["after"][method]["total"]["median"]
                          / summary["per_round"]["before"][method]["total"]["median"], 3) for method in METHODS}
    summary["rollout_tokens_per_cpu_second"] = _child(HERE, {"throughput": True, "repeats": max(args.repeats, 3)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary.get("after_over_before", {}), indent=2))
    print(json.dumps(summary["rollout_tokens_per_cpu_second"], indent=2))
    print(f"wrote {args.out}")


def _child(root: Path, spec: dict) -> dict:
    """Run one measurement in a fresh process with `root`'s package first on the path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": f"{root / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=HERE)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed ({spec}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
