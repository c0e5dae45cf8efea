"""Time and peak memory of what `reval train --task.data FILE` does before its first round.

    python benchmarks/data_scale.py --rows 1000000          # writes runs/data_scale/train.jsonl once

Loads the problems (`reval.data.load_problems`) and checks every prompt against the
context (`reval.model.prompts_too_long`) with the shipped model and the paper's prompt, as
`reval.train.train` does, and prints seconds per stage and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path


def write_rows(path: Path, rows: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as fh:
        for _ in range(rows):
            a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
            fh.write(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--file", type=Path, default=None)
    args = parser.parse_args()
    path = args.file or Path("runs/data_scale") / f"train-{args.rows}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_rows(path, args.rows)

    from reval.data import load_problems
    from reval.model import (default_model_path, load_model, prompts_too_long, resolve_template,
                             use_chat_template)

    model, tokenizer = load_model(default_model_path("add"))
    base = peak_rss_mb()
    t0 = time.perf_counter()
    problems = load_problems(str(path))
    t_load = time.perf_counter() - t0
    after_load = peak_rss_mb()
    t0 = time.perf_counter()
    too_long = prompts_too_long(model, tokenizer, [p.question for p in problems], 48, resolve_template("paper"),
                                use_chat_template(tokenizer, "auto"))
    t_check = time.perf_counter() - t0
    print(json.dumps({"rows": len(problems), "file_mb": round(path.stat().st_size / 2**20, 1),
                      "load_seconds": round(t_load, 1), "length_check_seconds": round(t_check, 1),
                      "too_long": len(too_long), "peak_rss_mb_model": round(base),
                      "peak_rss_mb_after_load": round(after_load), "peak_rss_mb": round(peak_rss_mb())}))


if __name__ == "__main__":
    main()
