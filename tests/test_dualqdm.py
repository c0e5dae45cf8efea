"""Dual Q-DM (`reval.losses.dualqdm`): the loss on hand-computed tensors, its limits (no
constraint: IQ-Learn's online objective, which is exactly MLE at gamma = 1; the zero-width box:
the project's IQ-Learn loss), micro-batch invariance, and runs through the loop (a round draws
demonstrations and samples answers; resume continues as if uninterrupted)."""

import json
import math

import pytest
import torch

from reval import offline
import reval.train as train_mod
from reval.buffer import collate
from reval.config import TrainConfig
from reval.data import Demonstration
from reval.distributed import LogProbModule
from reval.logprobs import sequence_logprobs
from reval.losses import ALGORITHMS, dualqdm_loss, iq_loss, mle_loss
from reval.model import PROMPT_TEMPLATE
from reval.rollout import Samples

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def _grad(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True)


# -- the loss on hand-computed tensors -----------------------------------------------------------

def _hand():
    """Vocabulary (A, B, EOS), one prompt x; demonstration (A, EOS), policy sample (B, EOS).
    Logits: at x (ln2, 0, 0), after xA (0, 0, ln2), after xB (0, 0, 0). The prompt's logits are one
    leaf shared by both rows (it is one state)."""
    s1 = torch.tensor([LN2, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    xa = torch.tensor([0.0, 0.0, LN2], dtype=torch.float64, requires_grad=True)
    xb = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)

    def row(states, actions):
        logits = torch.stack(states)
        return torch.log_softmax(logits, -1)[range(2), actions], torch.logsumexp(logits, -1)

    (lpe, ve), (lpp, vp) = row([s1, xa], [0, 2]), row([s1, xb], [1, 2])
    logp, v = torch.stack([lpe, lpp]), torch.stack([ve, vp])
    mask = torch.ones(2, 2, dtype=torch.float64)
    expert, weight = torch.tensor([True, False]), torch.tensor([0.5, 0.5], dtype=torch.float64)
    return (s1, xa, xb), (logp, v, mask, expert, weight)


def test_loss_and_gradients_on_hand_computed_tensors():
    (s1, xa, xb), args = _hand()
    loss, m = dualqdm_loss(*args, rho=1.0, r_min=-1.0, r_max=1.0, box_terminal=True, num_tokens=1)
    # (1) -(r1 + r2) of the demonstration = -(ln2 - ln4) - ln2 = 0; (2) V(x) = ln4;
    # (3) only the sample's first token is outside the box: r = -ln3 < -1, (ln3 - 1)^2
    assert loss.item() == pytest.approx(LN4 + (LN3 - 1) ** 2, abs=1e-12)
    assert loss.item() == pytest.approx(1.3960187, abs=1e-6)
    g1, ga, gb = _grad(loss, s1, xa, xb)
    # the prompt's logits: MLE's softmax - onehot(A), plus -2 (ln3 - 1) on B from the constraint
    assert g1.tolist() == pytest.approx([-0.5, 0.25 - 2 * (LN3 - 1), 0.25], abs=1e-12)
    assert ga.tolist() == pytest.approx([0.25, 0.25, -0.5], abs=1e-12)  # MLE's
    assert gb.tolist() == [0.0, 0.0, 0.0]  # the sample's own state: telescoped, and V(xB) held fixed
    assert m["q/outside_box_policy"] == 0.5 and m["q/outside_box_expert"] == 0.0
    assert m["loss/bellman"] == pytest.approx((LN3 - 1) ** 2 / 4)  # per boxed token


def test_the_terminal_token_is_boxed_only_when_asked():
    _, (logp, v, mask, expert, weight) = _hand()
    # a box [-0.5, 0.5]: the demonstration's r_T = Q(xA, EOS) = ln2 lies above it
    on, _ = dualqdm_loss(logp, v, mask, expert, weight, rho=1.0, r_min=-0.5, r_max=0.5, box_terminal=True,
                         num_tokens=1)
    off, _ = dualqdm_loss(logp, v, mask, expert, weight, rho=1.0, r_min=-0.5, r_max=0.5, num_tokens=1)
    first = (LN2 - LN4 + 0.5) ** 2 + (-LN3 + 0.5) ** 2  # the first tokens of both rows
    assert off.item() == pytest.approx(LN4 + first, abs=1e-12)
    assert on.item() == pytest.approx(LN4 + first + (LN2 - 0.5) ** 2, abs=1e-12)


# -- the limits ----------------------------------------------------------------------------------

def _groups(B_demo=3, G=2, T=7, seed=0):
    """Rows of B_demo groups (a demonstration, then G samples); V(s_1) shared within a group, as a
    prompt's value is; random lengths, random values."""
    g = torch.Generator().manual_seed(seed)
    B = B_demo * (1 + G)
    mask = torch.ones(B, T)
    for i, n in enumerate(torch.randint(1, T + 1, (B,), generator=g).tolist()):
        mask[i, n:] = 0
    logp = (-torch.rand(B, T, generator=g) * 3 * mask).requires_grad_()
    v0 = torch.randn(B_demo, generator=g).repeat_interleave(1 + G)  # V(prompt) of each group
    rest = torch.randn(B, T - 1, generator=g) * 5
    v = (torch.cat([v0[:, None], rest], 1) * mask).requires_grad_()
    expert = torch.tensor(([True] + [False] * G) * B_demo)
    weight = torch.where(expert, 0.5, 0.5 / max(G, 1))
    return logp, v, mask, expert, weight


def test_without_the_constraint_it_is_exactly_mle_at_gamma_one():
    logp, v, mask, expert, weight = _groups()
    n = int((mask * expert[:, None]).sum())
    ours, m = dualqdm_loss(logp, v, mask, expert, weight, rho=0.0, r_min=-2.0, r_max=2.0, num_tokens=n)
    mle, _ = mle_loss(logp[expert], mask[expert], num_tokens=n)
    assert ours.item() == pytest.approx(mle.item(), rel=1e-6)
    g_ours, g_mle = _grad(ours, logp, v), _grad(mle, logp, v)
    assert torch.allclose(g_ours[0], g_mle[0], atol=1e-7)  # only the demonstrations' tokens
    # V: every term telescopes away but V(prompt), which is one state per group (one number in a
    # model's forward): its gradient, summed over the group's rows, is 0
    assert torch.allclose(g_ours[1][:, 1:], torch.zeros_like(v[:, 1:]), atol=1e-7)
    assert torch.allclose(g_ours[1][:, 0].view(3, 3).sum(1), torch.zeros(3), atol=1e-7)
    assert g_ours[1][0, 0] != 0
    assert m["loss/nll"] == pytest.approx(mle.item(), rel=1e-6)


def test_without_the_constraint_it_is_the_iq_learn_online_objective():
    """rho = 0 at gamma < 1: IQ-Learn's -E_demo[Q - gamma V'] + E_mix[V - gamma V'], written out
    token by token; no longer MLE."""
    logp, v, mask, expert, weight = _groups(seed=1)
    gamma, n = 0.9, 11
    ours, _ = dualqdm_loss(logp, v, mask, expert, weight, rho=0.0, r_min=-2.0, r_max=2.0, gamma=gamma,
                           num_tokens=n)
    want = 0.0
    for i in range(len(mask)):
        T = int(mask[i].sum())
        for t in range(T):
            v_next = v[i, t + 1].item() if t + 1 < T else 0.0
            if expert[i]:
                want -= logp[i, t].item() + v[i, t].item() - gamma * v_next
            want += weight[i].item() * (v[i, t].item() - gamma * v_next)
    assert ours.item() == pytest.approx(want / n, rel=1e-6)
    mle, _ = mle_loss(logp[expert], mask[expert], num_tokens=n)
    assert ours.item() != pytest.approx(mle.item(), rel=1e-3)


def test_the_zero_width_box_on_demonstrations_alone_is_the_iq_loss():
    """Box [0, 0], rho = lambda, every token boxed, demonstrations only (weight 1): the value of
    MLE + lambda mean r_t^2, the project's IQ-Learn loss (its gradient differs: Dual Q-DM holds
    V(s_t+1) fixed inside the constraint)."""
    logp, v, mask, _, _ = _groups(G=0, seed=2)
    expert, weight = torch.ones(len(mask), dtype=torch.bool), torch.ones(len(mask))
    for gamma in (1.0, 0.8):
        ours, _ = dualqdm_loss(logp, v, mask, expert, weight, rho=0.3, r_min=0.0, r_max=0.0, gamma=gamma,
                               box_terminal=True)
        iq, _ = iq_loss(logp, v, mask, iq_lambda=0.3, gamma=gamma)
        assert ours.item() == pytest.approx(iq.item(), rel=1e-5)


def test_the_penalty_is_zero_inside_the_box():
    logp, v, mask, expert, weight = _groups(seed=3)
    free, _ = dualqdm_loss(logp, v, mask, expert, weight, rho=0.0, r_min=-1e3, r_max=1e3)
    boxed, m = dualqdm_loss(logp, v, mask, expert, weight, rho=10.0, r_min=-1e3, r_max=1e3)
    assert boxed.item() == free.item() and m["loss/bellman"] == 0.0
    tight, m = dualqdm_loss(logp, v, mask, expert, weight, rho=10.0, r_min=-0.1, r_max=0.1)
    assert tight.item() > free.item() + 1 and m["q/outside_box_policy"] > 0


def test_a_truncated_samples_last_token_is_not_boxed():
    """Its next state is unknown, so its implied reward is too: no box for it (iq.md's choice 4)."""
    logp, v, mask, expert, weight = _groups(G=1, seed=4)
    truncated = torch.zeros(len(mask), dtype=torch.bool)
    truncated[1] = True  # a sample cut at the budget
    last = int(mask[1].sum()) - 1
    kw = dict(rho=2.0, r_min=-0.5, r_max=0.5, box_terminal=True)  # finished: its EOS token would be boxed
    logp2 = logp.detach().clone()
    logp2[1, last] -= 50.0  # Q(s_T, a_T) of the cut token, far outside the box
    for flag, same in ((truncated, True), (None, False)):
        a, _ = dualqdm_loss(logp.detach(), v.detach(), mask, expert, weight, truncated=flag, **kw)
        b, _ = dualqdm_loss(logp2, v.detach(), mask, expert, weight, truncated=flag, **kw)
        assert (b.item() == pytest.approx(a.item(), rel=1e-6)) == same


# -- in the loop: micro-batches, rounds, resume ----------------------------------------------------

def _demo_and_samples(tok, G=2, truncate=True):
    demos = [Demonstration(f"{i}*3", f"{3 * i}") for i in range(1, 4)]
    exps = offline.to_experiences(demos, tok, template=PROMPT_TEMPLATE, chat=False, eos_id=tok.eos_token_id,
                                  version=0, round=0, first_group_id=0, first_uid=0)
    answers = [f"{3 * i + j}" for i in range(1, 4) for j in range(G)]
    ids = [list(tok(a, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id] for a in answers]
    if truncate:
        ids[-1] = ids[-1][:-1]  # one sample cut at the budget
    samples = Samples([list(exps[i // G].prompt_ids) for i in range(len(answers))], ids,
                      [False] * (len(ids) - 1) + [truncate])
    return offline.with_samples(exps, samples, G, version=0, first_uid=len(exps))


def test_with_samples_groups_each_demonstration_with_its_prompts_answers(tiny):
    _, tok = tiny
    rows = _demo_and_samples(tok)
    assert [r.reward for r in rows] == [1.0, 0.0, 0.0] * 3
    assert [r.group_id for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert {r.group_mean for r in rows} == {1 / 3}
    assert [r.uid for r in rows] == [0, 3, 4, 1, 5, 6, 2, 7, 8]
    assert rows[-1].truncated and not rows[0].truncated
    assert all(r.prompt_ids == rows[3 * (i // 3)].prompt_ids for i, r in enumerate(rows))


def test_micro_batches_give_the_full_batch_gradient(tiny):
    """One SGD step of lr 1 from the same weights: the weights after it are w - g, so equal
    weights mean equal gradient vectors, whatever the micro-batch size."""
    import copy

    model, tok = tiny
    batch = collate(_demo_and_samples(tok), tok.pad_token_id)
    after, metrics = {}, {}
    for micro in (9, 4, 1):
        m = copy.deepcopy(model)
        cfg = TrainConfig(algo="dualqdm")
        cfg.loss.dualqdm_r_min, cfg.loss.dualqdm_r_max = -0.05, 0.05  # the random model's rewards: outside
        cfg.optim.micro_batch_size, cfg.optim.max_grad_norm = micro, 1e9  # no clipping
        metrics[micro] = train_mod.update(LogProbModule(m), None, torch.optim.SGD(m.parameters(), lr=1.0), batch, cfg)
        after[micro] = [p.detach().clone() for p in m.parameters()]
    assert metrics[9]["loss/bellman"] > 0 and metrics[9]["q/outside_box_policy"] > 0
    moved = max((a - p).abs().max().item() for a, p in zip(after[9], model.parameters()))
    assert moved > 1e-3
    for micro in (4, 1):
        assert metrics[micro]["loss/total"] == pytest.approx(metrics[9]["loss/total"], rel=1e-5)
        assert all(torch.allclose(a, b, rtol=0, atol=1e-5 * moved) for a, b in zip(after[micro], after[9]))


def test_the_registry_normalises_by_the_demonstrations_tokens(tiny):
    model, tok = tiny
    batch = collate(_demo_and_samples(tok), tok.pad_token_id)  # with a truncated sample
    demo_tokens = int((batch.response_mask.sum(1) * (batch.reward == 1)).sum())
    assert ALGORITHMS["dualqdm"].denominator(batch) == demo_tokens < int(batch.response_mask.sum())
    logp, v = sequence_logprobs(model, batch, all_values=True)
    cfg = TrainConfig(algo="dualqdm").loss
    cfg.dualqdm_rho = 0.0
    t = {"logp": logp, "v": v, "mask": batch.response_mask, "reward": batch.reward, "group_mean": batch.group_mean,
         "truncated": batch.truncated}
    loss, _ = ALGORITHMS["dualqdm"].compute(t, cfg, demo_tokens)
    expert = batch.reward == 1
    mle, _ = mle_loss(logp[expert], batch.response_mask[expert])
    assert loss.item() == pytest.approx(mle.item(), rel=1e-5)  # rho = 0: MLE on the demonstrations


def _demos(path, n=8):
    path.write_text("".join(json.dumps({"prompt": f"{i}*2", "response": f"{2 * i}"}) + "\n" for i in range(n)))
    return path


def _cfg(tiny_dir, tmp_path, name="run", **overrides):
    cfg = TrainConfig(algo="dualqdm", rounds=2, out=tmp_path / name, progress=False, checkpoint_every=0,
                      report_to="none")
    cfg.model.path = str(tiny_dir)
    cfg.task.data = str(_demos(tmp_path / "demos.jsonl"))
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.rollout.max_new_tokens = 4, 3, 6
    cfg.optim.micro_batch_size, cfg.optim.lr = 5, 1e-3
    for k, v in overrides.items():
        section, _, field = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, field, v)
    return cfg


def _metrics(cfg):
    return [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]


def test_a_round_draws_demonstrations_and_samples_answers(tiny_dir, tmp_path):
    cfg = _cfg(tiny_dir, tmp_path, loss__dualqdm_r_min=-0.5, loss__dualqdm_r_max=0.5)
    result = train_mod.train(cfg)
    assert result["round"] == 2 and result["updates"] == 2
    assert result["samples"] == 2 * 4 * (1 + 3)  # demonstrations and sampled answers
    rows = _metrics(cfg)
    for r in rows:
        assert {"loss/nll", "loss/bellman", "q/reward_expert", "q/reward_policy", "q/outside_box_policy",
                "q/v_mean", "loss/total"} <= set(r)
        assert r["perf/generate_seconds"] > 0 and r["perf/skipped"] == 0.0
        # the sampled rows reached the loss: their own implied rewards, some outside the box
        assert r["q/outside_box_policy"] > 0 and r["q/reward_policy"] != r["q/reward_expert"]


def test_a_resumed_run_continues_as_if_uninterrupted(tiny_dir, tmp_path):
    straight = _cfg(tiny_dir, tmp_path, "straight", rounds=3)
    train_mod.train(straight)
    cut = _cfg(tiny_dir, tmp_path, "cut")
    train_mod.train(cut)  # checkpoint at round 2
    cut.rounds = 3
    assert train_mod.train(cut, resume=True)["round"] == 3
    a, b = _metrics(straight), _metrics(cut)
    assert [r["round"] for r in b] == [1, 2, 3]
    for key in ("loss/total", "loss/nll", "loss/bellman", "q/reward_policy", "data/response_len"):
        assert b[-1][key] == pytest.approx(a[-1][key], rel=1e-5), key
    from safetensors.torch import load_file

    wa = load_file(next((straight.out / "checkpoints").glob("round-*")) / "model" / "model.safetensors")
    wb = load_file(sorted((cut.out / "checkpoints").glob("round-*"))[-1] / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_rho_zero_trains_as_mle_through_the_loop(tiny_dir, tmp_path):
    """The paper's 'IQ-Learn reduces to BC', end to end: Dual Q-DM without its constraint, with
    answers sampled every round, ends at MLE's weights (same demonstrations, same order); with
    the constraint it does not."""
    from safetensors.torch import load_file

    def weights(cfg):
        cfg.optim.micro_batch_size = 64  # one micro-batch each
        train_mod.train(cfg)
        return load_file(next((cfg.out / "checkpoints").glob("round-*")) / "model" / "model.safetensors")

    mle = weights(_cfg(tiny_dir, tmp_path, "mle", algo="mle"))
    free = weights(_cfg(tiny_dir, tmp_path, "free", loss__dualqdm_rho=0.0))
    boxed = weights(_cfg(tiny_dir, tmp_path, "boxed", loss__dualqdm_rho=1.0, loss__dualqdm_r_min=-0.05,
                         loss__dualqdm_r_max=0.05))
    gap = lambda w: max((w[k] - mle[k]).abs().max().item() for k in mle)  # noqa: E731
    # float rounding only (Adam magnifies it where a gradient is tiny): 1% of one step of lr 1e-3
    assert gap(free) < 2e-5
    assert gap(boxed) > 100 * gap(free) and gap(boxed) > 1e-4


@pytest.mark.parametrize("field, value, match", [
    ("loss__dualqdm_r_max", -3.0, "loss.dualqdm_r_max"),
    ("loss__dualqdm_rho", -1.0, "loss.dualqdm_rho"),
    ("rollout__backend", "vllm", "dualqdm samples with HF generate"),
    ("schedule__mode", "async", "dualqdm samples with the policy itself"),
    ("rollout__sync_every", 2, "dualqdm samples with the policy itself"),
    ("rollout__lag", 1, "rollout.lag"),
])
def test_bad_settings_are_clear_errors(tiny_dir, tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        train_mod.train(_cfg(tiny_dir, tmp_path, **{field: value}))


def test_sampled_answers_cut_by_the_budget_are_reported(tiny_dir, tmp_path, capsys):
    """The random tiny model rarely says EOS within 6 tokens: the share is logged and the
    newcomer warned at the first round, as for RL answers."""
    cfg = _cfg(tiny_dir, tmp_path, rounds=1)
    train_mod.train(cfg)
    frac = _metrics(cfg)[0]["rollout/truncated_frac"]
    assert frac > 0.1
    said = capsys.readouterr()
    assert "rollout.max_new_tokens" in said.err + said.out


def test_revaltrainer_runs_dualqdm_on_prompt_response_rows(tiny_dir, tmp_path):
    from reval import ReValConfig, ReValTrainer

    rows = [{"prompt": f"{i}*2", "response": f"{2 * i}"} for i in range(4)]
    trainer = ReValTrainer(model=str(tiny_dir), train_dataset=rows, args=ReValConfig(
        algo="dualqdm", output_dir=str(tmp_path / "dq"), rounds=1, prompts_per_round=2, samples_per_prompt=2,
        max_new_tokens=4, dualqdm_rho=1.0, progress=False, report_to="none"))
    assert trainer.train_problems[0] == Demonstration("0*2", "0")
    result = trainer.train()
    assert result["updates"] == 1 and result["samples"] == 2 * (1 + 2)


def test_with_lora_and_an_evaluation_set(tiny_dir, tmp_path):
    """A LoRA adapter trains and is saved as one, and the eval set is scored each round."""
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"question": f"{i}*2", "answer": f"{2 * i}"}) + "\n" for i in range(3)))
    cfg = _cfg(tiny_dir, tmp_path, model__lora_rank=4)
    cfg.task.eval_data, cfg.eval.every = (str(evals),), 1
    result = train_mod.train(cfg)
    assert result["updates"] == 2
    rows = _metrics(cfg)
    assert sum("eval/accuracy" in r for r in rows) >= 2 and all(r["perf/skipped"] == 0.0 for r in rows
                                                                if "loss/total" in r)
    ckpt = sorted((cfg.out / "checkpoints").glob("round-*"))[-1]
    assert (ckpt / "model" / "adapter_config.json").exists()
