"""Latent actions (`reval.latent`, docs/latent.md): the model `reval pretrain --latent-codes` builds,
its codes' reconstruction of the text, generation that plays codes, the loss's log-probs of those
codes, save / load / resume, and the refusals."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from reval import offline
from reval.buffer import ReplayBuffer, collate
from reval.config import TrainConfig
from reval.latent import LatentActionModel, copy_of, generate_latent, is_latent, reconstruction, share_frozen
from reval.logprobs import sequence_logprobs
from reval.metrics import read_metrics
from reval.model import PROMPT_TEMPLATE, format_prompt, load_model
from reval.pretrain import PretrainConfig, _Dirty, pretrain
from reval.rollout import generate, to_experiences
from reval.tasks import TASKS
from reval.train import train


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory) -> Path:
    """A latent-action model of a fresh tiny Qwen2 on `add` (64 codes), built in ~40 s."""
    out = tmp_path_factory.mktemp("latent")
    pretrain(PretrainConfig(task="add", latent_codes=64, latent_from="fresh", hidden=32, layers=2, steps=300,
                            policy_steps=60, batch_size=32, lr=3e-3, eval_problems=8, out=out))
    return out


def _demos(tokenizer, n: int, seed: int = 5):
    task = TASKS["add"]
    problems = task.split("validation", n, seed=seed)
    exps = offline.to_experiences(problems, tokenizer, template=PROMPT_TEMPLATE, chat=False,
                                  eos_id=tokenizer.eos_token_id, version=0, round=0, first_group_id=0, first_uid=0,
                                  task=task, rng=random.Random(seed))
    return problems, exps


def test_inferred_codes_reconstruct_unseen_solutions(latent_dir):
    model, tok = load_model(latent_dir)
    assert is_latent(model) and model.codes == 64
    _, exps = _demos(tok, 64)
    rec = reconstruction(model, collate(exps, tok.pad_token_id))
    assert rec["token_accuracy"] >= 0.98, rec
    assert rec["exact"] >= 0.9, rec
    assert rec["codes_used"] >= 16, rec  # the codes do not collapse to a handful


def test_decoding_with_the_inferred_codes_reproduces_the_answers(latent_dir):
    """Free-running decoding (the world model's own tokens fed back) with the codes the inverse dynamics
    infers writes the training answer exactly wherever the teacher-forced reconstruction is exact."""
    model, tok = load_model(latent_dir)
    problems, exps = _demos(tok, 32)
    batch = collate(exps, tok.pad_token_id)  # one answer per prompt: rows stay in order
    codes = model.infer_codes(batch)  # (B, H)
    prompts = [format_prompt(tok, p.question) for p in problems]
    out = generate_latent(model, tok, prompts, max_new_tokens=codes.shape[1], codes=codes)
    same = [tuple(r) == e.response_ids for r, e in zip(out.response_ids, exps)]
    assert out.actions[0] == codes[0, :len(out.actions[0])].tolist()
    assert sum(same) / len(same) >= reconstruction(model, batch)["exact"] - 1e-9
    assert sum(same) / len(same) >= 0.9


def test_generation_plays_codes_and_the_loss_scores_exactly_those(latent_dir):
    """Sampled answers carry one code per token; the sampler's code log-probs equal the ones the loss
    recomputes from the collated batch (shared-prefix KV cache and the policy's K-way head)."""
    model, tok = load_model(latent_dir)
    torch.manual_seed(0)
    prompts = [format_prompt(tok, p.question) for p in TASKS["add"].split("validation", 3, seed=1)]
    samples = generate(model, tok, prompts, samples_per_prompt=4, max_new_tokens=24, return_logprobs=True)
    assert all(len(a) == len(r) for a, r in zip(samples.actions, samples.response_ids))
    assert len({tuple(a) for a in samples.actions}) > 1  # sampled, not greedy
    exps = to_experiences(samples, [0.0] * 12, samples_per_prompt=4, version=0, round=0, first_uid=0)
    assert all(e.action_ids for e in exps)
    batch = collate(exps, tok.pad_token_id)
    with torch.no_grad():
        logp, v = sequence_logprobs(model, batch)
    for i, e in enumerate(exps):  # collate keeps the prompt-major order here
        n = len(e.response_ids)
        assert torch.allclose(logp[i, :n], torch.tensor(samples.logprobs[i]), atol=1e-4)
    assert v.shape == (12,)
    torch.manual_seed(0)  # each prompt prefilled once for its 4 answers = the prompt written 4 times
    apart = generate(model, tok, [p for p in prompts for _ in range(4)], max_new_tokens=24, return_logprobs=True)
    assert apart.actions == samples.actions and apart.response_ids == samples.response_ids
    assert torch.allclose(torch.tensor(sum(apart.logprobs, [])), torch.tensor(sum(samples.logprobs, [])), atol=1e-5)
    greedy = generate(model, tok, prompts, max_new_tokens=24, greedy=True)
    again = generate(model, tok, prompts, max_new_tokens=24, greedy=True)
    assert greedy.response_ids == again.response_ids and greedy.actions == again.actions


def test_save_and_load_are_exact_and_only_the_policy_trains(latent_dir, tmp_path):
    model, tok = load_model(latent_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("policy.") for n in trainable)
    assert model.get_output_embeddings().weight.shape == (64, 32)  # the policy's head scores codes
    model.save_pretrained(tmp_path / "again")
    tok.save_pretrained(tmp_path / "again")
    loaded, _ = load_model(tmp_path / "again")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for replica in (copy_of(model), share_frozen(loaded, model)):  # a stale sampler, the reference
        assert all(getattr(replica, n) is getattr(model, n) for n in LatentActionModel.FROZEN)
        assert all(p is not q for p, q in zip(replica.policy.parameters(), model.policy.parameters()))
        assert all(torch.equal(p, q) for p, q in zip(replica.state_dict().values(), a.values()))
    (tmp_path / "again" / "latent.json").write_text("{")
    with pytest.raises(OSError, match="latent-action model .* is unreadable"):
        load_model(tmp_path / "again")
    (tmp_path / "again" / "latent.safetensors").write_bytes(b"broken")
    with pytest.raises(OSError, match="latent.safetensors is unreadable"):
        load_model(tmp_path / "again")


def test_the_buffer_keeps_the_codes_through_a_checkpoint():
    from reval.rollout import Experience

    exps = [Experience((1, 2), (3, 4, 5), 1.0, 0, 0.5, 0.5, 0, 0, False, uid=0, action_ids=(7, 8, 9)),
            Experience((1, 2), (6,), 0.0, 0, 0.5, 0.5, 0, 0, False, uid=1, action_ids=(10,))]
    buf = ReplayBuffer(8)
    buf.add(exps)
    again = ReplayBuffer(8)
    again.load_state_dict(buf.state_dict())
    assert list(again._items) == exps
    batch = collate(exps, 0)
    assert batch.action_ids.tolist() == [[7, 8, 9], [10, 0, 0]]
    assert batch.slice(1, 2).action_ids.tolist() == [[10]]
    with pytest.raises(ValueError, match="one code per token"):
        collate([exps[0], Experience((1,), (2, 3), 0.0, 1, 0, 0, 0, 0, False, action_ids=(4,))], 0)


def _cfg(path, out: Path, rounds: int, algo: str = "reval") -> TrainConfig:
    cfg = TrainConfig(algo=algo, rounds=rounds, out=out, progress=False, checkpoint_every=1)
    cfg.model.path = str(path)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens = 4, 4, 24
    cfg.buffer.capacity, cfg.optim.micro_batch_size = 32, 8
    cfg.task.num_test, cfg.eval.every, cfg.eval.samples = 8, 1, 2
    return cfg


def ones(completions: list[str], **_) -> list[float]:
    """A reward the untrained tiny model earns sometimes (it cannot add yet): two or more 1s."""
    return [float(c.count("1") >= 2) for c in completions]


@pytest.mark.parametrize("algo", ["reval", "grpo"])
def test_latent_rl_trains_the_policy_and_resumes_exactly(algo, latent_dir, tmp_path):
    train(_cfg(latent_dir, tmp_path / "full", 3, algo), reward_funcs=[ones])
    train(_cfg(latent_dir, tmp_path / "part", 2, algo), reward_funcs=[ones])
    train(_cfg(latent_dir, tmp_path / "part", 3, algo), resume=True, reward_funcs=[ones])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "seconds"}  # noqa: E731
                          for r in rows]
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert strip(full) == strip(read_metrics(tmp_path / "part" / "metrics.jsonl"))
    assert 0 < sum(r["rollout/reward_mean"] for r in full if "rollout/reward_mean" in r) < 3  # a signal to learn
    start, _ = load_model(latent_dir)
    trained, _ = load_model(tmp_path / "full")  # the run's newest checkpoint
    a, b = start.state_dict(), trained.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith("policy.") for k in moved)  # the world model stayed frozen
    from reval.loop.build import check_latent

    cfg = _cfg(tmp_path / "full", tmp_path / "next", 1)  # a run directory as the model: its newest checkpoint
    cfg.model.lora_rank = 4
    with pytest.raises(ValueError, match="latent-action model .*lora-rank"):
        check_latent(cfg, tmp_path / "full")


@pytest.mark.parametrize("change, match", [
    (lambda c: setattr(c, "algo", "dpo"), "--algo dpo"),
    (lambda c: setattr(c.model, "lora_rank", 4), "lora-rank"),
    (lambda c: setattr(c.rollout, "backend", "vllm"), "backend vllm"),
    (lambda c: setattr(c.model, "gradient_checkpointing", True), "gradient-checkpointing"),
])
def test_what_a_latent_model_cannot_do_is_refused_by_name(change, match, latent_dir, tmp_path):
    from reval.loop.build import check_latent

    cfg = _cfg(latent_dir, tmp_path / "x", 1)
    check_latent(cfg, latent_dir)  # reval over codes: fine
    change(cfg)
    with pytest.raises(ValueError, match=f"latent-action model .*{match}"):
        check_latent(cfg, latent_dir)
    with pytest.raises(ValueError, match="2 processes"):
        check_latent(_cfg(latent_dir, tmp_path / "x", 1), latent_dir, processes=2)


def test_the_run_refuses_before_it_starts(latent_dir, tmp_path):
    with pytest.raises(ValueError, match="is a latent-action model"):
        pretrain(PretrainConfig(task="add", model=str(latent_dir), steps=1, eval_problems=2, out=tmp_path / "p"))
    cfg = _cfg(latent_dir, tmp_path / "x", 1)
    cfg.model.lora_rank = 4
    with pytest.raises(ValueError, match="latent-action model .*lora-rank"):
        train(cfg)
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_pretrain_options_are_checked_and_dirty_rows_are_noise():
    for bad in (dict(latent_codes=1), dict(corrupt=1.0), dict(latent_codes=8, loss="iq"),
                dict(latent_codes=8, latent_from="fresh", model="x"), dict(corrupt=0.2, data="rows.jsonl")):
        with pytest.raises(ValueError):
            PretrainConfig(**bad).resolved()
    resolved = PretrainConfig(task="mul", latent_codes=64).resolved()
    assert resolved.model.endswith("warmstart-mul") and resolved.policy_steps == resolved.steps
    task = TASKS["mul"]
    problems = task.split("train", 400, seed=0)
    dirty = _Dirty(task, 0.2, problems[:50])
    # the same random stream writes the clean solution first: a row is kept as is, or made noise
    changed = 0
    for i, p in enumerate(problems):
        clean, text = task.warmstart_solution(p, random.Random(i)), dirty.warmstart_solution(p, random.Random(i))
        changed += text != clean
        assert len(text) == len(clean) and set(text) <= set(dirty.alphabet)
    assert 0.14 < changed / len(problems) < 0.26  # about a fifth of the rows
