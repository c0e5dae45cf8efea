"""GPU smoke run: the real-model path (bf16 autocast, gradient checkpointing, chunked log-probs,
LoRA or full fine-tuning, math data scored by math-verify) on one CUDA device.

    python benchmarks/gpu_smoke.py --out benchmarks/results/gpu_smoke.json

No weights can be downloaded, so it uses models built here: (1) the shipped warm-start model
on the embedded task, to check that ReVal learns on a GPU as it does on a CPU; (2) a randomly
initialised Qwen2 with Qwen2.5's 151,936-token vocabulary (~0.3B parameters) trained on
addition problems in DeepScaleR's schema with long answers, to measure generation and update
throughput and peak GPU memory. A random model earns no reward, so (2) measures cost only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_real_style  # noqa: E402  (the tiny real-style tokenizer and config)
from reval.config import TrainConfig  # noqa: E402
from reval.tasks.arithmetic import split  # noqa: E402
from reval.train import train  # noqa: E402


def big_model(path: Path) -> Path:
    """A Qwen2 with a 151,936 vocabulary, hidden 1024, 12 layers, saved with a chat tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    build_real_style(path, "qwen2", vocab_size=151_936)
    cfg = AutoConfig.from_pretrained(path)
    cfg.update({"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
                "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                "layer_types": ["full_attention"] * 12})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    return path


def run(name: str, cfg: TrainConfig) -> dict:
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = train(cfg)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if "perf/generate_seconds" in r]
    out = {
        "name": name, "wall_seconds": time.time() - t0, "rounds": len(rounds),
        "answers": result["samples"], "updates": result["updates"],
        "generate_seconds": sum(r["perf/generate_seconds"] for r in rounds),
        "update_seconds": sum(r["perf/update_seconds"] for r in rounds),
        "mean_response_tokens": sum(r["rollout/response_len"] for r in rounds) / len(rounds),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30,
        "evals": [{k: v for k, v in r.items() if k.startswith("eval/") or k == "round"}
                  for r in rows if any(k.startswith("eval/") for k in r)],
    }
    tokens = out["mean_response_tokens"] * out["answers"]
    out["generated_tokens_per_second"] = tokens / out["generate_seconds"]
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_smoke.json"))
    ap.add_argument("--only", default="tiny,big_full,big_lora")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this smoke run needs a CUDA device"
    work = Path(tempfile.mkdtemp())
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    only = args.only.split(",")
    if "tiny" in only:  # the embedded default on a GPU: accuracy must rise as on the CPU
        cfg = TrainConfig(rounds=15, out=work / "tiny", progress=False, checkpoint_every=0)
        cfg.eval.every = 5
        results["runs"].append(run("shipped model, embedded task, ReVal, 15 rounds", cfg))
    if {"big_full", "big_lora"} & set(only):
        model_dir = big_model(work / "qwen2-151k")
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps({"problem": p.question, "answer": int(p.answer)}) + "\n"
                                for p in split("train", 512, 3, seed=1)))
        for name, lora in (("big_full", 0), ("big_lora", 16)):
            if name not in only:
                continue
            cfg = TrainConfig(rounds=3, out=work / name, progress=False, checkpoint_every=0)
            cfg.model.path, cfg.model.mixed_precision, cfg.model.gradient_checkpointing = str(model_dir), "bf16", True
            cfg.model.logprob_chunk, cfg.model.lora_rank = 256, lora
            cfg.task.data, cfg.task.preset = str(data), "deepscaler"
            cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens = 16, 8, 1024
            cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.optim.lr = 640, 16, 1e-6
            cfg.loss.beta = 0.002
            results["runs"].append(run(f"Qwen2 0.3B random, 151k vocab, {'LoRA r16' if lora else 'full FT'}, "
                                       "bf16 autocast, grad ckpt, chunk 256, 16x8 answers of <=1024 tokens", cfg))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
