"""A real-size vocabulary end to end on the CPU: the shipped `mul` warm start padded to Qwen2.5's
151,936 tokens (benchmarks/large_vocab.py), trained with ReVal through the memory settings a
1.5B run takes: fused chunked log-probs, LoRA, gradient checkpointing, bf16 autocast.
The same model through vLLM: tests/test_vllm_engine.py."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from reval.config import TrainConfig
from reval.model import default_model_path, format_prompt, load_model
from reval.rollout import generate
from reval.tasks import TASKS
from reval.train import train

spec = importlib.util.spec_from_file_location("large_vocab", Path(__file__).parents[1] / "benchmarks" / "large_vocab.py")
large_vocab = importlib.util.module_from_spec(spec)
sys.modules["large_vocab"] = large_vocab
spec.loader.exec_module(large_vocab)


@pytest.fixture(scope="session")
def large_vocab_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("large-vocab")
    large_vocab.build(path, prompts=32, held_out=16)
    return path


@pytest.mark.slow
def test_the_padded_model_is_real_size_and_answers_as_the_warm_start(large_vocab_dir):
    info = json.loads((large_vocab_dir / "large_vocab.json").read_text())
    assert info["vocab_size"] == 151_936 and 20e6 <= info["parameters"] <= 50e6
    assert info["max_log_prob_new_tokens"] < -10  # the new tokens start improbable on unseen states
    model, tok = load_model(large_vocab_dir)
    base, base_tok = load_model(default_model_path("mul"))
    assert model.get_output_embeddings().weight.shape == (151_936, 128) and len(tok) == 151_936
    prompts = [format_prompt(tok, p.question) for p in TASKS["mul"].split("test", 16, seed=0)]
    ours = generate(model, tok, prompts, greedy=True, max_new_tokens=112)
    theirs = generate(base, base_tok, prompts, greedy=True, max_new_tokens=112)
    assert ours.response_ids == theirs.response_ids
    assert tok.decode([151_935]) == "<x151935>"  # a new token decodes, so a sampled one would show


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["full", "lora-ckpt"])
def test_reval_trains_at_151936_tokens_with_the_memory_settings(large_vocab_dir, tmp_path, memory):
    cfg = TrainConfig(algo="reval", rounds=2, out=tmp_path / "run", progress=False, checkpoint_every=0,
                      report_to="none")
    cfg.task.name, cfg.model.path, cfg.model.logprob_chunk = "mul", str(large_vocab_dir), 64
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.buffer.capacity = 4, 4, 32
    cfg.optim.lr, cfg.optim.micro_batch_size, cfg.task.num_test, cfg.eval.every = 1e-3, 8, 8, 0
    if memory == "lora-ckpt":
        cfg.model.lora_rank, cfg.model.gradient_checkpointing, cfg.model.mixed_precision = 16, True, "bf16"
    result = train(cfg)
    rounds = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "rollout/reward_mean" in x]
    assert result["updates"] == 4 and all(r["perf/skipped"] == 0 for r in rounds)
    assert any(r["rollout/reward_mean"] > 0 for r in rounds)  # the warm start still scores at 151,936 tokens
    assert any(r["loss/grad_norm"] > 0 for r in rounds)
    final = tmp_path / "run" / "checkpoints" / "round-000002" / "model"
    if memory == "lora-ckpt":
        assert (final / "adapter_config.json").exists()
    else:  # the full model moved
        trained = load_model(final)[0].get_output_embeddings().weight
        start = load_model(large_vocab_dir)[0].get_output_embeddings().weight
        assert not torch.equal(trained[:99], start[:99])
