#!/usr/bin/env bash
# The validation-split grid behind the demo's per-algorithm settings (README, "Results").
# Each run: 15 rounds of 16 prompts x 8 answers, greedy validation accuracy every round.
# Selection rule: highest mean validation accuracy over rounds 1-15 (speed and stability).
# Prints one line per run: mean accuracy, answers to 90%, the curve. ~10 minutes on 2 cores.
set -euo pipefail
out=${1:-runs/tune}
V="--task.eval-split validation --eval.samples 0 --eval.every 1 --rounds 15 --checkpoint-every 0 --no-progress"
run() { name=$1; shift; reval train $V "$@" --out "$out/$name" > "$out/$name.log" 2>&1; }
mkdir -p "$out"
run reval-lr1e-4-K2 --algo reval --optim.lr 1e-4
run reval-lr2e-4-K2 --algo reval --optim.lr 2e-4
run reval-lr3e-4-K2 --algo reval --optim.lr 3e-4
run reval-lr1e-4-K4 --algo reval --optim.lr 1e-4 --buffer.updates-per-round 4
run grpo-lr2e-4 --algo grpo --optim.lr 2e-4
run grpo-lr3e-4 --algo grpo --optim.lr 3e-4
python - "$out" <<'PY'
import json, pathlib, sys
for d in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.jsonl")):
    ev = [r for r in map(json.loads, d.read_text().splitlines()) if "eval/accuracy" in r]
    accs = [r["eval/accuracy"] for r in ev[1:]]
    to90 = next((r["samples"] for r in ev if r["eval/accuracy"] >= 0.9), None)
    print(f"{d.parent.name:18s} mean={sum(accs) / len(accs):.3f} answers_to_90={to90}",
          " ".join(f"{a:.2f}" for a in accs))
PY
