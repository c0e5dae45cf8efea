"""A model with a real-size vocabulary, built here, trained with ReVal on the CPU end to end.

    python benchmarks/large_vocab.py build --out runs/large-vocab-model     # a few minutes, 160 MB
    python benchmarks/large_vocab.py run                                   # HF rollouts -> results
    .venv-vllm/bin/python benchmarks/large_vocab.py run --backend vllm     # vLLM rollouts (its env)

No weights can be downloaded here, and a random model earns no reward (ReVal's gradient is
then exactly zero), so the model is the shipped `mul` warm start with its vocabulary padded to
Qwen2.5's 151,936 tokens: 39.7M parameters, of which 38.9M are the two (V, D) embedding
tables, untied, as in Qwen2.5-7B. It answers exactly as the warm start does, so ReVal learns
on it, while every step touches the large vocabulary: sampling over 151,936 logits, the chunked
(fused) log-probs and V(s_1), the LoRA and reference paths, vLLM's weight push.

- Tokenizer: the warm start's byte-level BPE without merges, its vocabulary extended with
  151,837 entries `<xN>`. Without merges no text ever encodes to them (every id is checked to
  stay the same on the task's text), but each decodes, so a sampled one shows up in the answer.
- Input embeddings of the new tokens: Gaussian rows with the old rows' std.
- Output rows of the new tokens: -`margin` * u + small noise, where u is a unit direction with
  h . u > 0 for every final hidden state h of the warm start's own sampled answers (found by
  maximising the smallest h . u over 38k states). Every new token then starts with a logit far
  below every old one, as a trained model's unused tokens do; `build` measures their total
  probability on held-out states (sampled at temperature 1.5) and refuses a model where it is
  not negligible.

`run` trains ReVal for a few rounds on `mul` (16 prompts x 8 answers, K = 2) in one
configuration per row, each in its own process, and records round time, peak RSS and accuracy:
  full      full fine-tuning, fused log-probs (chunk 256)
  lora      LoRA rank 16 on every linear layer (the reference is the base with the adapter off)
  lora-ckpt LoRA + gradient checkpointing + bf16 autocast (the paper presets' memory settings)
Results: benchmarks/results/large_vocab_<backend>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

VOCAB = 151_936  # Qwen2.5's
RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "full": [],
    "lora": ["--model.lora-rank", "16"],
    "lora-ckpt": ["--model.lora-rank", "16", "--model.gradient-checkpointing", "--model.mixed-precision", "bf16"],
}


def _hidden_states(model, tokenizer, split: str, n: int, seed: int, temperature: float) -> torch.Tensor:
    """(N, D) final hidden states at every answer position of the model's own sampled answers."""
    from reval.buffer import collate
    from reval.logprobs import _concatenated_hidden
    from reval.model import format_prompt
    from reval.rollout import generate, to_experiences
    from reval.tasks import TASKS

    prompts = [format_prompt(tokenizer, p.question) for p in TASKS["mul"].split(split, n, seed=seed)]
    torch.manual_seed(seed)
    samples = generate(model, tokenizer, prompts, samples_per_prompt=4, max_new_tokens=112, temperature=temperature)
    batch = collate(to_experiences(samples, [0.0] * len(samples.response_ids), samples_per_prompt=4, version=0,
                                   round=0), tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = _concatenated_hidden(model.get_decoder(), batch)  # (B, H, D)
    return hidden[batch.response_mask.bool()]


def _away_direction(states: torch.Tensor, steps: int = 500) -> torch.Tensor:
    """A unit vector u maximising (a soft) min over states of h . u."""
    e = states.mean(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([e], lr=0.05)
    for _ in range(steps):
        proj = states @ (e / e.norm())
        loss = torch.logsumexp(-5 * proj, 0) / 5  # soft max of -h . u
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (e / e.norm()).detach()


def _padded_tokenizer(source: Path, out: Path, vocab_size: int) -> None:
    """Copy the tokenizer files, the vocabulary extended to `vocab_size` unreachable entries."""
    data = json.loads((source / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    assert not data["model"]["merges"] and not data["model"].get("ignore_merges")
    vocab.update({f"<x{i}>": i for i in range(len(vocab), vocab_size)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text((source / "tokenizer_config.json").read_text())


def build(out: Path, vocab_size: int = VOCAB, margin: float = 40.0, seed: int = 0, prompts: int = 128,
          held_out: int = 64) -> dict:
    """Write the padded model to `out`; returns what was measured while building it. The
    direction u comes from 4 sampled answers to each of `prompts` training problems, the check
    from 4 answers at temperature 1.5 to each of `held_out` test problems."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from reval.model import default_model_path, load_model, load_tokenizer
    from reval.tasks import TASKS

    source = default_model_path("mul")
    base, tok = load_model(source)
    old = base.config.vocab_size
    states = _hidden_states(base, tok, "train", prompts, seed=1, temperature=1.0)
    u = _away_direction(states)
    config = Qwen2Config(**{**base.config.to_dict(), "vocab_size": vocab_size, "tie_word_embeddings": False})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in base.state_dict().items() if "embed" not in k and "lm_head" not in k},
                              strict=False)
        embed, head, old_embed = (model.get_input_embeddings().weight, model.get_output_embeddings().weight,
                                  base.get_input_embeddings().weight)
        embed[:old] = old_embed
        embed[old:].normal_(0, old_embed.std().item())
        head[:old] = old_embed  # the warm start ties its head to the embeddings
        head[old:] = -margin * u + 0.01 * torch.randn(vocab_size - old, u.numel())
    model.generation_config = base.generation_config
    model.save_pretrained(out)
    _padded_tokenizer(source, out, vocab_size)

    # checks: the same ids for the task's text, the same greedy answers, no mass on new tokens
    padded_tok = load_tokenizer(out)
    text = [p.question for p in TASKS["mul"].split("test", 50, seed=0)]
    assert padded_tok(text)["input_ids"] == tok(text)["input_ids"], "the padded tokenizer encodes differently"
    held = _hidden_states(base, tok, "test", held_out, seed=2, temperature=1.5)
    with torch.no_grad():  # log p(any new token) at each held-out state, 1024 states at a time
        worst = max((torch.logsumexp(logits[:, old:], -1) - torch.logsumexp(logits, -1)).max().item()
                    for logits in (h @ head.T for h in held.split(1024)))  # (1024, V)
    if worst > -10:
        raise RuntimeError(f"new tokens keep up to exp({worst:.1f}) of the probability; raise margin")
    info = {"path": str(out), "vocab_size": vocab_size, "parameters": sum(p.numel() for p in model.parameters()),
            "embedding_parameters": embed.numel() + head.numel(), "direction_states": len(states),
            "min_h_dot_u_train": (states @ u).min().item(), "held_out_states": len(held),
            "min_h_dot_u_held_out": (held @ u).min().item(), "max_log_prob_new_tokens": worst}
    (out / "large_vocab.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _train_one(model: Path, name: str, backend: str, rounds: int, out: Path) -> dict:
    """One configuration in this process (called in a child): train, then report."""
    from reval.config import TrainConfig
    from reval.metrics import read_metrics
    from reval.train import train

    argv = ["--task.name", "mul", "--model.path", str(model), "--rounds", str(rounds), "--out", str(out),
            "--rollout.backend", backend, "--model.logprob-chunk", "256", "--optim.lr", "1e-4",
            "--buffer.updates-per-round", "2", "--optim.micro-batch-size", "32", "--eval.every", "0",
            "--task.num-test", "100", "--checkpoint-every", "0", "--no-progress", "--report-to", "none",
            *CONFIGS[name]]
    import tyro

    cfg = tyro.cli(TrainConfig, args=argv)
    start = time.time()
    result = train(cfg)
    rounds_ = [r for r in read_metrics(out / "metrics.jsonl") if "rollout/reward_mean" in r]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/accuracy" in r]
    return {"config": name, "backend": backend, "args": argv, "wall_s": time.time() - start,
            "round_s": [r["perf/generate_seconds"] + r["perf/update_seconds"] for r in rounds_],
            "generate_s": [r["perf/generate_seconds"] for r in rounds_],
            "update_s": [r["perf/update_seconds"] for r in rounds_],
            "reward_mean": [r["rollout/reward_mean"] for r in rounds_],
            "accuracy": [e["eval/accuracy"] for e in evals], "updates": result["updates"],
            "peak_rss_gib": _peak_rss_gib(), "torch_threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, default=Path("runs/large-vocab-model"))
    r = sub.add_parser("run")
    r.add_argument("--model", type=Path, default=Path("runs/large-vocab-model"))
    r.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--configs", default=",".join(CONFIGS))
    r.add_argument("--runs", type=Path, default=Path("runs/large-vocab"))
    r.add_argument("--results", type=Path, default=None)
    one = sub.add_parser("one")  # internal: one configuration, in a child process
    one.add_argument("model", type=Path)
    one.add_argument("name")
    one.add_argument("backend")
    one.add_argument("rounds", type=int)
    one.add_argument("out", type=Path)
    args = p.parse_args()
    if args.cmd == "build":
        print(json.dumps(build(args.out), indent=2))
    elif args.cmd == "one":
        print("RESULT " + json.dumps(_train_one(args.model, args.name, args.backend, args.rounds, args.out)))
    else:
        if not (args.model / "config.json").exists():
            print(json.dumps(build(args.model), indent=2))
        rows = []
        for name in args.configs.split(","):
            out = args.runs / f"{args.backend}-{name}"
            if out.exists():
                import shutil

                shutil.rmtree(out)
            proc = subprocess.run([sys.executable, __file__, "one", str(args.model), name, args.backend,
                                   str(args.rounds), str(out)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[len("RESULT "):]))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "args"}))
        info = json.loads((args.model / "large_vocab.json").read_text())
        results = args.results or RESULTS / f"large_vocab_{args.backend}.json"
        results.write_text(json.dumps({"model": info, "torch": torch.__version__,
                                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows},
                                      indent=2) + "\n")
        print(f"wrote {results}")


if __name__ == "__main__":
    main()
