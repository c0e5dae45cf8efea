"""DPO: the loss on hand-computed tensors, log 2 at theta = ref, micro-batch invariance,
the value against TRL's `DPOTrainer` on the same model, reference and data, and a short
learning test on the shipped `mul` warm start (docs/dpo.md)."""

import copy
import math
import random

import pytest
import torch

from reval import offline
from reval.buffer import collate
from reval.config import TrainConfig
from reval.data import PreferencePair
from reval.distributed import LogProbModule
from reval.logprobs import sequence_logprobs
from reval.losses import dpo_loss
from reval.model import PROMPT_TEMPLATE, build_tiny_model, default_model_path, format_prompt, load_model, \
    load_tokenizer
from reval.reference import Reference
from reval.tasks import multiply
from reval.train import update

# -- the loss on tensors ------------------------------------------------------------------------

# 2 pairs x 3 positions; the last column is masked out and holds garbage that must not count.
LOGP = torch.tensor([[-1.0, -2.0, 50.0],   # pair 0 chosen:   h = (1 + 2) = 3
                     [-3.0, -1.0, 50.0],   # pair 0 rejected: h = (-2 + 0) = -2
                     [-1.0, -1.0, 50.0],   # pair 1 chosen:   h = 0
                     [-0.5, 0.0, 50.0]],   # pair 1 rejected: h = 10
                    dtype=torch.float64)
REF_LOGP = torch.tensor([[-2.0, -4.0, 0.0],
                         [-1.0, -1.0, 0.0],
                         [-1.0, -1.0, 0.0],
                         [-10.5, 0.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)


def test_dpo_hand_computed():
    # beta 0.1: z_0 = 0.1 (3 - (-2)) = 0.5, z_1 = 0.1 (0 - 10) = -1.
    # -log sigmoid(z) = softplus(-z): softplus(-0.5) = log(1 + e^-0.5) = 0.4740769841801067,
    # softplus(1) = log(1 + e) = 1.3132616875182228; mean 0.8936693358491647.
    loss, m = dpo_loss(LOGP, REF_LOGP, MASK, beta=0.1)
    assert loss.item() == pytest.approx(0.8936693358491647, abs=1e-12)
    assert m["loss/dpo"] == pytest.approx(0.8936693358491647, abs=1e-12)
    assert m["rewards/chosen"] == pytest.approx((0.3 + 0.0) / 2)
    assert m["rewards/rejected"] == pytest.approx((-0.2 + 1.0) / 2)
    assert m["rewards/margin"] == pytest.approx((0.5 - 1.0) / 2)
    assert m["rewards/accuracy"] == 0.5  # pair 0 ranked right, pair 1 wrong
    # label smoothing eps: -(1 - eps) log sigmoid(z) - eps log sigmoid(-z) = softplus(-z) + eps z,
    # so with eps = 0.1: pair 0 0.4740769841801067 + 0.05, pair 1 1.3132616875182228 - 0.1.
    loss, m = dpo_loss(LOGP, REF_LOGP, MASK, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx((0.5240769841801067 + 1.2132616875182228) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.8686693358491647, abs=1e-12)
    assert m["rewards/margin"] == pytest.approx(-0.25)  # the rewards do not depend on eps
    # num_pairs: the sum over these pairs divided by the whole batch's pairs
    loss4, _ = dpo_loss(LOGP, REF_LOGP, MASK, beta=0.1, num_pairs=4)
    assert loss4.item() == pytest.approx(2 * 0.8936693358491647 / 4, abs=1e-12)


def test_dpo_needs_whole_pairs():
    with pytest.raises(ValueError, match="pairs"):
        dpo_loss(LOGP[:3], REF_LOGP[:3], MASK[:3], beta=0.1)


def test_dpo_at_reference_is_log2_and_gradient_is_exact():
    logp = LOGP.clone().requires_grad_(True)
    loss, m = dpo_loss(logp, LOGP.detach(), MASK, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-15)
    assert m["rewards/accuracy"] == 0.0 and m["rewards/margin"] == 0.0  # ties count as wrong (TRL's >)
    loss.backward()
    # dL/dz = -sigmoid(-z) / N = -0.5 / 2 at z = 0; dz/dlogp = +-beta on answer tokens
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)[:, None]
    assert torch.allclose(logp.grad, -0.25 * 0.1 * sign * MASK, atol=1e-15)


# -- on a model: the loop's data path ----------------------------------------------------------

def _pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    """`n` (worked solution, the warm start's flawed one) pairs of the `mul` task: answers of
    different lengths (a dropped carry shortens a step) and prompts of different lengths."""
    out = []
    for p in multiply.split("train", 4 * n, seed=seed):
        right, rng = multiply.solution(p.a, p.b), random.Random(p.a * 100 + p.b)
        wrong = next((w for w in (multiply.solution(p.a, p.b, rng) for _ in range(50)) if w != right), None)
        if wrong is not None:  # some problems leave no room for the warm start's mistakes
            out.append(PreferencePair(p.question, right, wrong))
        if len(out) == n:
            return out
    raise AssertionError("not enough problems with a possible mistake")


def _batch(pairs, tokenizer, template=PROMPT_TEMPLATE):
    experiences = offline.to_experiences(pairs, tokenizer, template=template, chat=False,
                                         eos_id=tokenizer.eos_token_id, version=0, round=0, first_group_id=0,
                                         first_uid=0)
    return experiences, collate(experiences, tokenizer.pad_token_id)


def _dpo_config(beta: float = 0.1, micro_batch_size: int = 64, lr: float = 0.0) -> TrainConfig:
    cfg = TrainConfig(algo="dpo")
    cfg.loss.beta, cfg.optim.micro_batch_size, cfg.optim.lr = beta, micro_batch_size, lr
    return cfg


@pytest.fixture(scope="module")
def models():
    """(tokenizer, policy, reference): two differently seeded tiny Qwen2s over the char tokenizer."""
    tok = load_tokenizer(default_model_path("mul"))
    return tok, build_tiny_model(len(tok), hidden=32, layers=2, heads=2, seed=1), \
        build_tiny_model(len(tok), hidden=32, layers=2, heads=2, seed=0)


def test_dpo_on_a_model_at_reference_is_log2_and_gradients_flow(models):
    tok, policy, _ = models
    policy = copy.deepcopy(policy)
    _, batch = _batch(_pairs(3), tok)
    with torch.no_grad():
        ref_logp, _ = sequence_logprobs(policy, batch)
    logp, _ = sequence_logprobs(policy, batch)
    loss, _ = dpo_loss(logp, ref_logp, batch.response_mask, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    grads = [p.grad for p in policy.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0


def test_dpo_micro_batches_keep_pairs_whole_and_change_nothing(models):
    """One update with micro-batches of 3 rows (rounded down to 1 pair) equals one over the
    whole batch: the same loss, metrics and new weights."""
    tok, policy, ref = models
    _, batch = _batch(_pairs(4), tok)
    results = []
    for micro in (3, 64):
        model = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        m = update(LogProbModule(model), Reference(model, copy.deepcopy(ref)), optimizer, batch,
                   _dpo_config(micro_batch_size=micro))
        results.append((m, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (m_small, w_small), (m_full, w_full) = results
    for key in ("loss/total", "loss/dpo", "rewards/chosen", "rewards/rejected", "rewards/margin",
                "rewards/accuracy", "loss/grad_norm"):
        assert m_small[key] == pytest.approx(m_full[key], abs=1e-6), key
    assert torch.allclose(w_small, w_full, atol=1e-6)
    # on tensors: two micro-batches of one pair each, divided by num_pairs = 2, sum to the full loss
    full, _ = dpo_loss(LOGP, REF_LOGP, MASK, beta=0.1)
    parts = [dpo_loss(LOGP[i:i + 2], REF_LOGP[i:i + 2], MASK[i:i + 2], beta=0.1, num_pairs=2)[0] for i in (0, 2)]
    assert sum(parts).item() == pytest.approx(full.item(), abs=1e-12)


# -- against TRL ---------------------------------------------------------------------------------

@pytest.fixture()
def offline_hub(monkeypatch):
    """Nothing is downloaded; accelerate's process-wide state, which TRL's Trainer sets up on
    the CPU, is reset afterwards so later tests get their usual device."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' renamed gradient_checkpointing, via TRL
def test_dpo_matches_trl_dpo_trainer(models, tmp_path, offline_hub):
    """Our loss (the loop's path: pairs -> Experience -> Batch -> update) equals TRL 1.16's
    DPOTrainer.compute_loss (loss_type "sigmoid") on the same model, reference and data, and
    both see the same token ids (the prompt TRL gets is our formatted prompt)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, policy, ref = models
    pairs = _pairs(3) + [PreferencePair("12*34", "\\boxed{408}", "\\boxed{4080}")]  # a short, unequal pair
    experiences, batch = _batch(pairs, tok)
    assert len({len(e.response_ids) for e in experiences}) > 2 and len({len(e.prompt_ids) for e in experiences}) > 1

    data = Dataset.from_dict({"prompt": [format_prompt(tok, p.prompt, PROMPT_TEMPLATE) for p in pairs],
                              "chosen": [p.chosen for p in pairs], "rejected": [p.rejected for p in pairs]})
    args = DPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=len(pairs),
                     max_steps=1, learning_rate=0.0, save_strategy="no", beta=0.1, gradient_checkpointing=False,
                     bf16=False, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    # TRL patches its models' forward: it gets copies
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args, train_dataset=data,
                         processing_class=tok)
    examples = [trainer.train_dataset[i] for i in range(len(pairs))]
    for i, ex in enumerate(examples):  # identical token ids: prompt, answer + EOS
        assert list(experiences[2 * i].prompt_ids) == ex["prompt_ids"]
        assert list(experiences[2 * i].response_ids) == ex["chosen_ids"]
        assert list(experiences[2 * i + 1].response_ids) == ex["rejected_ids"]
        assert ex["chosen_ids"][-1] == ex["rejected_ids"][-1] == tok.eos_token_id
    trainer.model.train()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # the loop's update (lr 0: the value only), one pair per micro-batch, both forward paths
    for shared_prefix in (True, False):
        cfg = _dpo_config(micro_batch_size=2)
        cfg.model.shared_prefix = shared_prefix
        model = copy.deepcopy(policy)
        ours = update(LogProbModule(model, shared_prefix=shared_prefix), Reference(model, copy.deepcopy(ref)),
                      torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)
        assert ours["loss/total"] == pytest.approx(trl_loss, abs=1e-5)
        assert ours["loss/dpo"] == pytest.approx(trl_loss, abs=1e-5)
        assert ours["rewards/chosen"] == pytest.approx(trl["rewards/chosen"], abs=1e-5)
        assert ours["rewards/rejected"] == pytest.approx(trl["rewards/rejected"], abs=1e-5)
        assert ours["rewards/margin"] == pytest.approx(trl["rewards/margins"], abs=1e-5)
        assert ours["rewards/accuracy"] == trl["rewards/accuracies"]
    assert abs(trl["rewards/margins"]) > 1e-3 and abs(trl_loss - math.log(2)) > 1e-4  # not a trivial point
    # TRL 1.16's sigmoid loss ignores label_smoothing; ours is the conservative form, which differs
    with torch.no_grad():
        logp, _ = sequence_logprobs(policy, batch)
        ref_logp, _ = sequence_logprobs(ref, batch)
    smoothed, _ = dpo_loss(logp, ref_logp, batch.response_mask, beta=0.1, label_smoothing=0.1)
    z = torch.tensor(trl["rewards/margins"])  # mean z; per pair: softplus(-z) + eps z
    assert smoothed.item() == pytest.approx(trl_loss + 0.1 * z.item(), abs=1e-5)


# -- learning ------------------------------------------------------------------------------------

def test_dpo_learns_the_preferences_on_the_mul_warm_start():
    """10 DPO updates (lr 1e-4, beta 0.1) on 16 (right, flawed) worked solutions from the shipped
    warm start: the pairs' margin and accuracy rise from 0 (theta = ref). 16 pairs, not 32: the
    same picture in half the time (under 10 s on one core)."""
    torch.manual_seed(0)
    model, tok = load_model(default_model_path("mul"))
    reference = Reference(model, copy.deepcopy(model))
    _, batch = _batch(_pairs(16, seed=1), tok)
    cfg = _dpo_config(lr=1e-4)
    policy = LogProbModule(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    history = [update(policy, reference, optimizer, batch, cfg) for _ in range(10)]
    with torch.no_grad():
        _, after = dpo_loss(policy(batch)[0], reference.logprobs(batch)[0], batch.response_mask, beta=0.1)
    first = history[0]  # metrics are taken before each step: the first at theta = ref
    assert first["rewards/margin"] == 0.0 and first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-6)
    margins = [m["rewards/margin"] for m in history] + [after["rewards/margin"]]
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert after["rewards/margin"] > 0.3, after  # 0.59 here
    assert after["rewards/accuracy"] >= 0.75, after  # 15 of 16 pairs
    assert after["rewards/chosen"] > 0 > after["rewards/rejected"], after
    assert after["loss/dpo"] < first["loss/dpo"] - 0.1, after  # 0.693 -> 0.456
