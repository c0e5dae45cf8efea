"""Loss values on hand-computed tensors, calibration, clipping, micro-batch invariance."""

import copy
import math

import pytest
import torch

from reval.buffer import collate
from reval.config import TrainConfig
from reval.distributed import LogProbModule
from reval.logprobs import sequence_logprobs
from reval.losses import ALGORITHMS, grpo_advantage, grpo_loss, reval_loss, tbrm_loss
from reval.reference import Reference
from reval.rewards import shape_reward
from reval.rollout import Experience
from reval.train import micro_batches, old_logprobs, update


def test_reval_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    ref_logp = torch.tensor([[-1.5, -1.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    v, ref_v = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])
    r = torch.tensor([1.0, 0.0])
    loss, m = reval_loss(logp, ref_logp, v, ref_v, mask, r, beta=0.5)
    # traj 0: (2-1) + (0.5 - 1.0) - 1/0.5 = -1.5 ; traj 1: 0 + 0 - 0 = 0
    assert loss.item() == pytest.approx((1.5**2 + 0.0) / 2)
    assert m["loss/residual_mean"] == pytest.approx(-0.75)
    # With num_trajectories the sum is divided by the whole batch's size.
    loss4, _ = reval_loss(logp, ref_logp, v, ref_v, mask, r, beta=0.5, num_trajectories=4)
    assert loss4.item() == pytest.approx(1.5**2 / 4)


def test_reval_squares_the_sum_not_each_token():
    logp = torch.tensor([[0.0, 0.0]])
    ref_logp = torch.tensor([[1.0, -1.0]])  # token residuals +-1 cancel in the sum
    loss, _ = reval_loss(logp, ref_logp, torch.zeros(1), torch.zeros(1), torch.ones(1, 2),
                         torch.zeros(1), beta=1.0)
    assert loss.item() == 0.0


def test_tbrm_hand_computed_and_differs_by_vref():
    logp = torch.tensor([[-1.0, -2.0]])
    ref_logp = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    v, r = torch.tensor([2.0]), torch.tensor([1.0])
    loss, _ = tbrm_loss(logp, ref_logp, v, mask, r, beta=0.5)
    assert loss.item() == pytest.approx((2.0 - 0.5 - 2.0) ** 2)  # V + log-ratio - r/beta
    reval, _ = reval_loss(logp, ref_logp, v, torch.tensor([2.0]), mask, r, beta=0.5)
    assert reval.item() == pytest.approx((0.0 - 0.5 - 2.0) ** 2)


def _experiences(tokenizer, rewards, version=0):
    out = []
    for i, r in enumerate(rewards):
        prompt = tuple(tokenizer(f"Q: {i}+{i}=?\nA: ", add_special_tokens=False)["input_ids"])
        resp = tuple(tokenizer(f"{2 * i}" + "|" * (i % 3), add_special_tokens=False)["input_ids"])
        out.append(Experience(prompt, resp + (tokenizer.eos_token_id,), r, i // 4, 0.5, 0.5,
                              version, 0, False))
    return out


def test_reval_calibrated_at_init_tbrm_not(tiny):
    """policy == reference and reward 0: ReVal's loss and gradient are exactly zero."""
    model, tok = tiny
    ref = copy.deepcopy(model).requires_grad_(False)
    batch = collate(_experiences(tok, [0.0] * 6), tok.pad_token_id)
    logp, v = sequence_logprobs(model, batch)
    with torch.no_grad():
        ref_logp, ref_v = sequence_logprobs(ref, batch)
    loss, _ = reval_loss(logp, ref_logp, v, ref_v, batch.response_mask, batch.reward, beta=0.05)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())

    model.zero_grad()
    logp, v = sequence_logprobs(model, batch)
    loss, _ = tbrm_loss(logp, ref_logp, v, batch.response_mask, batch.reward, beta=0.05)
    loss.backward()
    assert loss.item() > 1.0  # V_ref(s_1) = logsumexp of the logits, far from 0
    assert sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None) > 0


def test_grpo_group_normalisation():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = [r[:4], r[4:]]
    mean = torch.cat([g.mean().expand(len(g)) for g in groups])
    std = torch.cat([g.std(unbiased=False).expand(len(g)) for g in groups])
    adv = grpo_advantage(r, mean, std)
    assert adv[:4].tolist() == pytest.approx([math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)], rel=1e-4)
    assert adv[4:].tolist() == [0.0, 0.0]  # all-correct group carries no signal


def test_grpo_clipping():
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]]))  # ratios 1.5, 1.5, 0.5, 0.5
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1)
    loss, m = grpo_loss(logp, old, mask, adv, clip_low=0.2, clip_high=0.28)
    # per token: -min(1.5, 1.28) = -1.28 ; -min(-1.5, -1.28) = 1.5 ;
    #            -min(0.5, 0.8) = -0.5   ; -min(-0.5, -0.8) = 0.8
    assert loss.item() == pytest.approx((-1.28 + 1.5 - 0.5 + 0.8) / 4)
    assert m["loss/clip_fraction"] == pytest.approx(0.5)
    # Clipped tokens pass no gradient.
    logp = logp.clone().requires_grad_(True)
    grpo_loss(logp, old, mask, adv)[0].backward()
    assert logp.grad[0].item() == 0.0 and logp.grad[3].item() == 0.0
    assert logp.grad[1].item() != 0.0 and logp.grad[2].item() != 0.0


def test_grpo_token_mean_vectorised_matches_loop():
    torch.manual_seed(0)
    logp, old = torch.randn(3, 5) * 0.1, torch.randn(3, 5) * 0.1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([0.7, -1.2, 0.3])
    loss, _ = grpo_loss(logp, old, mask, adv)
    terms = []
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                ratio, a = math.exp(logp[b, t] - old[b, t]), adv[b].item()
                terms.append(-min(ratio * a, min(max(ratio, 0.8), 1.28) * a))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_reward_variants():
    r, mean = torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.25])
    assert shape_reward(r, mean, "binary").tolist() == [1.0, 0.0]
    assert shape_reward(r, mean, "group_mean").tolist() == [0.75, -0.25]
    assert shape_reward(r, mean, "plus_minus_one").tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="unknown reward variant"):
        shape_reward(r, mean, "nope")


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_micro_batch_does_not_change_the_update(tiny, algo):
    """Gradient accumulation over micro-batches of 2 equals one batch of 8."""
    model, tok = tiny
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # move the policy off the reference so ReVal has a signal
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    batch = collate(_experiences(tok, [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]), tok.pad_token_id)
    grads = []
    for mb in (8, 2):
        m = copy.deepcopy(model)
        cfg = TrainConfig(algo=algo)
        cfg.optim.micro_batch_size = mb
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        old = None
        if algo == "grpo":  # a non-trivial pi_old so the ratio is not 1
            noise = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(0))
            old = [lp + 0.1 * noise[i * mb:(i + 1) * mb, : lp.shape[1]] * micro.response_mask
                   for i, (lp, micro) in enumerate(zip(old_logprobs(LogProbModule(m), batch, cfg, "cpu"),
                                                       micro_batches(batch, mb)))]
        before = [p.detach().clone() for p in m.parameters()]
        metrics = update(LogProbModule(m), Reference(m, ref), opt, batch, cfg, old)
        grads.append([b - p.detach() for b, p in zip(before, m.parameters())])
        assert metrics["perf/skipped"] == 0.0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(a.abs().sum() > 0 for a in grads[0])
