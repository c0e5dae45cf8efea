"""Our GRPO against TRL 1.16's GRPOTrainer as benchmarks/bench.py configures it (loss_type dapo,
scale_rewards group, beta 0, clip 0.2 / 0.28): the same answers give the same advantages, pi_old,
loss and gradient, at a point where the ratio is not 1 (the K > 1 reuse path, with clipping)."""

from __future__ import annotations

import copy

import pytest
import torch

from reval.buffer import collate
from reval.config import TrainConfig
from reval.distributed import LogProbModule
from reval.loop.learner import old_logprobs, update
from reval.losses import grpo_advantage
from reval.model import default_model_path, format_prompt, load_model
from reval.rollout import Samples, group_stats, to_experiences
from reval.tasks import TASKS

P, G = 4, 4


@pytest.fixture()
def offline_hub(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class GradCapture(torch.optim.Optimizer):
    """An optimizer whose step records the accumulated gradients and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads: list[torch.Tensor] = []

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]


def _perturb(model, seed: int = 0, scale: float = 0.3) -> None:
    """The same weight change on every copy: the policy after some updates (ratio != 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=gen))


def test_group_stats_sample_std_is_bessel_corrected():
    rewards = [1.0, 0.0, 0.0, 0.0]
    mean, pop = group_stats(rewards)
    _, sample = group_stats(rewards, ddof=1)
    r = torch.tensor(rewards)
    assert mean == 0.25 and pop == pytest.approx(r.std(unbiased=False).item())
    assert sample == pytest.approx(r.std(unbiased=True).item()) and sample == pytest.approx(pop * (4 / 3) ** 0.5)
    assert group_stats([1.0], ddof=1) == (0.0, 1.0)  # a group of one: raw reward, either way


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_grpo_matches_trl_grpo_trainer(tmp_path, offline_hub):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import split_tensor_dict

    model, tok = load_model(default_model_path("mul"))
    problems = TASKS["mul"].split("train", 20, seed=0)[:P]
    data = Dataset.from_list([{"prompt": format_prompt(tok, p.question), "answer": p.answer} for p in problems])
    scored: list[float] = []

    def reward(prompts, completions, completion_ids, **_):  # deterministic, mixed within a group
        out = [float(sum(ids) % 3) for ids in completion_ids]
        scored.extend(out)
        return out

    args = GRPOConfig(output_dir=str(tmp_path), seed=0, use_cpu=True, bf16=False, report_to="none",
                      save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                      per_device_train_batch_size=P * G // 2, gradient_accumulation_steps=2, num_generations=G,
                      num_iterations=2, max_steps=2, shuffle_dataset=False, max_completion_length=24,
                      temperature=1.0, top_p=1.0, top_k=0, learning_rate=0.0, lr_scheduler_type="constant",
                      max_grad_norm=1e9, gradient_checkpointing=False, disable_dropout=True, beta=0.0,
                      epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group")
    trainer = GRPOTrainer(model=copy.deepcopy(model), processing_class=tok, reward_funcs=[reward], args=args,
                          train_dataset=data)
    trainer.model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([data[i] for i in range(P) for _ in range(G)])
    assert "old_per_token_logps" in out  # num_iterations 2: TRL keeps pi_old, as our K > 1 does

    # the same answers through our path: Samples -> Experience (sample std) -> Batch
    cmask = out["completion_mask"].bool()
    samples = Samples(prompt_ids=[ids[m].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"].bool())],
                      response_ids=[ids[m].tolist() for ids, m in zip(out["completion_ids"], cmask)],
                      truncated=[tok.eos_token_id not in ids[m].tolist() for ids, m in zip(out["completion_ids"], cmask)])
    assert len(set(scored)) > 1 and len(set(map(tuple, samples.prompt_ids))) == P
    ours = [tok(format_prompt(tok, p.question), add_special_tokens=False)["input_ids"] for p in problems]
    assert samples.prompt_ids == [ids for ids in ours for _ in range(G)]  # the prompt tokens our loop samples from
    exps = to_experiences(samples, scored, samples_per_prompt=G, version=0, round=0, first_uid=0, std_ddof=1)
    batch = collate(exps, tok.pad_token_id)
    assert [list(e.response_ids) for e in exps] == samples.response_ids  # prompt-major either way: same order

    adv = grpo_advantage(batch.reward, batch.group_mean, batch.group_std, eps=1e-4)
    torch.testing.assert_close(adv, out["advantages"], atol=1e-5, rtol=1e-5)
    pop = to_experiences(samples, scored, samples_per_prompt=G, version=0, round=0)  # our default differs
    pop_adv = grpo_advantage(torch.tensor(scored), torch.tensor([e.group_mean for e in pop]),
                             torch.tensor([e.group_std for e in pop]))
    assert (pop_adv - out["advantages"]).abs().max() > 1e-2

    cfg = TrainConfig(algo="grpo")
    cfg.loss.grpo_std, cfg.loss.grpo_eps = "sample", 1e-4
    cfg.optim.micro_batch_size, cfg.optim.max_grad_norm = P * G // 2, 1e9
    cfg.buffer.updates_per_round = 2
    old = old_logprobs(LogProbModule(copy.deepcopy(model)), batch, cfg, "cpu")
    ours_old = torch.cat([o for o in old])
    torch.testing.assert_close(ours_old * batch.response_mask, out["old_per_token_logps"] * cmask,
                               atol=1e-5, rtol=1e-4)

    # a later update: both policies moved the same way from pi_old
    _perturb(trainer.model)
    trl_loss = 0.0
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.zero_grad()
    for micro in split_tensor_dict(out, 2):
        loss = trainer.compute_loss(trainer.model, micro)
        loss.backward()
        trl_loss += loss.item()
    trl_grads = [p.grad.clone() for p in trainer.model.parameters()]

    for shared_prefix in (True, False):
        mine = copy.deepcopy(model)
        _perturb(mine)
        opt = GradCapture(mine.parameters())
        m = update(LogProbModule(mine, shared_prefix=shared_prefix), None, opt, batch, cfg, old_logp=old)
        assert m["loss/total"] == pytest.approx(trl_loss, abs=1e-5)
        assert 0 < m["loss/clip_fraction"] < 1, m  # the clip is exercised
        flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
        diff = (flat(opt.grads) - flat(trl_grads)).norm() / flat(trl_grads).norm()
        assert diff < 1e-4, f"gradient differs from TRL's by {diff:.2e} (relative), shared_prefix={shared_prefix}"


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("k", [1, 2])
def test_grpo_steps_match_trl_through_its_own_loop(k, tmp_path, offline_hub):
    """Two rounds of TRL's real training loop (sampling, shuffling, K Adam steps per generation
    batch) and our `update` with AdamW on the answers TRL sampled: the weights move the same."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, tok = load_model(default_model_path("mul"))
    problems = TASKS["mul"].split("train", 20, seed=0)[:2 * P]  # 2 rounds of P prompts, in order
    data = Dataset.from_list([{"prompt": format_prompt(tok, p.question), "answer": p.answer} for p in problems])
    scored: list[list[float]] = []

    def reward(prompts, completions, completion_ids, **_):
        out = [float(sum(ids) % 3) for ids in completion_ids]
        scored.append(out)
        return out

    args = GRPOConfig(output_dir=str(tmp_path), seed=0, use_cpu=True, bf16=False, report_to="none",
                      save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, logging_steps=1,
                      per_device_train_batch_size=P * G // 2, gradient_accumulation_steps=2, num_generations=G,
                      num_iterations=k, max_steps=2 * k, shuffle_dataset=False, max_completion_length=24,
                      temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-3, lr_scheduler_type="constant",
                      warmup_steps=0, weight_decay=0.0, max_grad_norm=1e9, gradient_checkpointing=False,
                      disable_dropout=True, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
                      scale_rewards="group")
    trainer = GRPOTrainer(model=copy.deepcopy(model), processing_class=tok, reward_funcs=[reward], args=args,
                          train_dataset=data)
    batches = []
    generate = trainer._generate_and_score_completions

    def capture(inputs):
        out = generate(inputs)
        batches.append({key: v.detach().clone() if torch.is_tensor(v) else v for key, v in out.items()})
        return out

    trainer._generate_and_score_completions = capture
    trainer.train()
    assert len(batches) == 2 and len(scored) == 2  # one generation batch per round

    cfg = TrainConfig(algo="grpo")
    cfg.loss.grpo_std, cfg.loss.grpo_eps = "sample", 1e-4
    cfg.optim.micro_batch_size, cfg.optim.max_grad_norm = P * G // 2, 1e9
    cfg.buffer.updates_per_round = k
    mine = copy.deepcopy(model)
    policy = LogProbModule(mine)
    opt = torch.optim.AdamW(mine.parameters(), lr=1e-3, weight_decay=0.0)
    for out, rewards in zip(batches, scored):
        cmask = out["completion_mask"].bool()
        samples = Samples(
            prompt_ids=[ids[m].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"].bool())],
            response_ids=[ids[m].tolist() for ids, m in zip(out["completion_ids"], cmask)],
            truncated=[tok.eos_token_id not in ids[m].tolist() for ids, m in zip(out["completion_ids"], cmask)])
        batch = collate(to_experiences(samples, rewards, samples_per_prompt=G, version=0, round=0, std_ddof=1),
                        tok.pad_token_id)
        old = old_logprobs(policy, batch, cfg, "cpu") if k > 1 else None
        for _ in range(k):
            update(policy, None, opt, batch, cfg, old_logp=old)

    start = dict(model.named_parameters())
    theirs, ours = dict(trainer.model.named_parameters()), dict(mine.named_parameters())
    moved = torch.cat([(theirs[n] - start[n]).flatten() for n in start])
    diff = torch.cat([(ours[n] - theirs[n]).flatten() for n in start])
    assert moved.norm() > 1e-3  # the weights did move
    assert diff.norm() / moved.norm() < 1e-3, f"weights differ from TRL's by {diff.norm() / moved.norm():.2e} of the step"
