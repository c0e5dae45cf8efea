"""Shared plumbing of the offline-algorithm studies (iq_study.py, preference_study.py, dualqdm_study.py);
the others (replay_study.py, latent_study.py) share its command line, `study_args`.

Each training run is a child process (`python STUDY.py child --job FILE`), `workers` at a
time, one thread each; a run whose result file exists is skipped, so an interrupted stage
continues where it stopped. A run trains with `reval.train.train` from a dotted config,
keeps only its final model, and the study evaluates that model with `generations`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean

from reval.config import TrainConfig
from reval.demo import set_field


def study_args(doc: str, name: str, out: Path, stages: tuple[str, ...] = ("all", "tune", "run", "report"),
               ) -> tuple[argparse.Namespace, Path, Path]:
    """The command line every study shares, with its own `stages`: (args, results directory, work
    directory). The results
    go to `out` (`runs/NAME-quick` with --quick); models, data files and run directories go to
    `runs/NAME`, which is not committed (with --quick: the results directory)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=stages)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    results = a.out or (Path(f"runs/{name}-quick") if a.quick else out)
    work = results if a.quick else Path(f"runs/{name}")
    for d in (results, work):
        d.mkdir(parents=True, exist_ok=True)
    return a, results, work


def launch(script: str, jobs: list[dict], workers: int = 2, fresh: bool = False) -> list[dict]:
    """Run every job (a dict with at least "result") in a child process of `script`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def one(job: dict) -> None:
        if Path(job["result"]).exists() and not fresh:
            return
        Path(job["result"]).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(job, f)
        proc = subprocess.run([sys.executable, script, "child", "--job", f.name], stderr=subprocess.PIPE,
                              text=True, env=env)
        Path(f.name).unlink()
        if proc.returncode != 0:
            raise RuntimeError(f"run {job['name']} failed:\n{proc.stderr[-3000:]}")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(one, jobs))
    return [json.loads(Path(job["result"]).read_text()) for job in jobs]


def train_run(config: dict, run_dir: Path, **kwargs) -> Path:
    """Train from a dotted config ({"algo": "dpo", "optim.lr": 1e-4, ...}); the final model's directory."""
    from reval.train import train

    shutil.rmtree(run_dir, ignore_errors=True)
    tc = TrainConfig(out=run_dir, progress=False, checkpoint_every=0, keep_checkpoints=1, report_to="none")
    for key, value in config.items():
        set_field(tc, key, value)
    train(tc, **kwargs)
    return sorted((run_dir / "checkpoints").glob("round-*"))[-1] / "model"


def load(model_dir):
    """(model, tokenizer) of a run's final model: a HF directory (with a Q-Adapter head if it has
    one), or a LoRA checkpoint, whose adapter is merged into the base model it names."""
    from reval.model import load_model

    adapter = Path(model_dir) / "adapter_config.json"
    if adapter.exists():
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        model, tok = load_model(base, tokenizer_path=model_dir)
        model = PeftModel.from_pretrained(model, model_dir).merge_and_unload()
    else:
        model, tok = load_model(model_dir)
    return model.eval(), tok


def pair_margins(model_dir, pairs: list[dict]) -> list[float]:
    """log pi(chosen | prompt) - log pi(rejected | prompt) under the model, per pair (EOS included)."""
    import torch

    from reval import offline
    from reval.buffer import collate
    from reval.data import PreferencePair
    from reval.logprobs import sequence_logprobs
    from reval.model import PROMPT_TEMPLATE

    model, tok = load(model_dir)
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), 32):
            chunk = [PreferencePair(**p) for p in pairs[start:start + 32]]
            exps = offline.to_experiences(chunk, tok, template=PROMPT_TEMPLATE, chat=False, eos_id=tok.eos_token_id,
                                          version=0, round=0, first_group_id=0, first_uid=0)
            for i in range(0, len(exps), 2):  # one pair per batch: collate reorders rows by prompt
                logp, _ = sequence_logprobs(model, collate(exps[i:i + 2], tok.pad_token_id))
                out.append(float(logp[0].sum() - logp[1].sum()))
    return out


def generations(model_dir, questions: list[str], *, samples: int = 0, max_new_tokens: int = 48,
                seed: int = 0, batch_size: int = 200) -> list[list[str]]:
    """Per question: the greedy answer (samples = 0) or `samples` answers at temperature 1."""
    import torch

    from reval.model import PROMPT_TEMPLATE, eos_token_ids, format_prompt
    from reval.rollout import generate

    model, tok = load(model_dir)
    torch.manual_seed(seed)
    out: list[list[str]] = []
    for start in range(0, len(questions), batch_size):
        prompts = [format_prompt(tok, q, PROMPT_TEMPLATE) for q in questions[start:start + batch_size]]
        s = generate(model, tok, prompts, samples_per_prompt=max(samples, 1), greedy=samples == 0,
                     max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids(model, tok))
        texts = tok.batch_decode(s.response_ids, skip_special_tokens=True)
        k = max(samples, 1)
        out += [texts[i:i + k] for i in range(0, len(texts), k)]
    return out


def mean_sd(values: list[float]) -> dict:
    """Mean, min, max and the values themselves, for a results table."""
    return {"mean": mean(values), "min": min(values), "max": max(values), "values": values}


def child_main(run_job) -> None:
    """The `child --job FILE` entry point: run the job and write its result file."""
    job = json.loads(Path(sys.argv[sys.argv.index("--job") + 1]).read_text())
    result = run_job(job)
    result["job"] = job
    Path(job["result"]).write_text(json.dumps(result, indent=1) + "\n")
    print(f"  {job['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()
                                            if isinstance(v, float)), flush=True)
