"""IQ-Learn (`reval.losses.iq`): MLE at lambda = 0, the TD term on hand-computed numbers,
terminal and truncated rows, V at every position, micro-batch invariance, `reval pretrain`."""

import json

import pytest
import torch

from reval.buffer import collate
from reval.logprobs import sequence_logprobs
from reval.losses import iq_loss, mle_loss
from reval.rollout import Experience


def _random(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T)
    for i, n in enumerate(torch.randint(1, T + 1, (B,), generator=g).tolist()):
        mask[i, n:] = 0  # right padding
    logp = (-torch.rand(B, T, generator=g) * 3 * mask).requires_grad_()
    v = (torch.randn(B, T, generator=g) * mask).requires_grad_()
    return logp, v, mask


def _grad(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True)


def _batch(tok, eos_id):
    """Three demonstrations, two sharing a prompt, answers of different lengths (+ EOS)."""
    rows = [("Q: 12*3\nA: ", "36"), ("Q: 12*3\nA: ", "3 6 ok"), ("Q: 7\nA: ", "7 + 0 = 7")]
    exps = [Experience(tuple(tok(p, add_special_tokens=False)["input_ids"]),
                       tuple(tok(r, add_special_tokens=False)["input_ids"]) + (eos_id,), 1.0, group_id=i,
                       group_mean=1.0, group_std=0.0, version=0, round=0, truncated=False, uid=i)
            for i, (p, r) in enumerate(rows)]
    return collate(exps, tok.pad_token_id)


# -- (a) lambda = 0 is MLE -------------------------------------------------------------------

def test_lambda_zero_is_exactly_mle_value_and_gradient():
    logp, v, mask = _random()
    iq, _ = iq_loss(logp, v, mask, iq_lambda=0.0, gamma=0.9)
    mle, _ = mle_loss(logp, mask)
    assert torch.equal(iq, mle)
    g_iq, g_mle = _grad(iq, logp, v), _grad(mle, logp, v)
    assert torch.equal(g_iq[0], g_mle[0])
    assert torch.equal(g_iq[1], torch.zeros_like(v)) and torch.equal(g_mle[1], torch.zeros_like(v))


def test_mle_equals_the_hf_labels_loss(tiny):
    model, tok = tiny
    batch = _batch(tok, tok.eos_token_id)
    logp, v = sequence_logprobs(model, batch, all_values=True)
    ours, metrics = mle_loss(logp, batch.response_mask)
    # Hugging Face: each row prompt + answer, right-padded, labels on the answer tokens only
    seqs = [(batch.prompt(i), batch.response_ids[i][batch.response_mask[i].bool()].tolist())
            for i in range(len(batch))]
    T = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), T), tok.pad_token_id)
    labels = torch.full((len(seqs), T), -100)
    attention = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p):len(p) + len(r)] = torch.tensor(r)
        attention[i, :len(p) + len(r)] = 1
    hf = model(input_ids=ids, attention_mask=attention, labels=labels).loss
    torch.testing.assert_close(ours, hf, atol=1e-5, rtol=1e-5)
    assert metrics["loss/nll"] == pytest.approx(hf.item(), abs=1e-5)
    iq, _ = iq_loss(logp, v, batch.response_mask, iq_lambda=0.0, truncated=batch.truncated)
    assert torch.equal(iq, ours)


# -- (b, c) the TD term, terminal and truncated rows -----------------------------------------

# 2 rows x 3 tokens, row 1 has one padded position; gamma 0.9
LOGP = [[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]]
V = [[2.0, 1.0, 3.0], [1.0, 2.0, 0.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
# Q = logp + v:             row 0 [1, -1, 2.5],       row 1 [0, 1]
# V(s_t+1) (0 after EOS):   row 0 [1, 3, 0],          row 1 [2, 0]
# r = Q - 0.9 V(s_t+1):     row 0 [0.1, -3.7, 2.5],   row 1 [-1.8, 1]
# r^2:                      row 0 [0.01, 13.69, 6.25], row 1 [3.24, 1]   sum 24.19, 5 tokens
NLL = (1 + 2 + 0.5 + 1 + 1) / 5  # 1.1
TD = 24.19 / 5  # 4.838


def _hand(v=V, dtype=torch.float64):
    return (torch.tensor(LOGP, dtype=dtype, requires_grad=True), torch.tensor(v, dtype=dtype, requires_grad=True),
            torch.tensor(MASK, dtype=dtype))


def test_td_term_on_hand_computed_tensors():
    logp, v, mask = _hand()
    loss, m = iq_loss(logp, v, mask, iq_lambda=0.5, gamma=0.9)
    assert loss.item() == pytest.approx(NLL + 0.5 * TD)  # 3.519
    assert m["loss/nll"] == pytest.approx(1.1) and m["loss/td"] == pytest.approx(4.838)
    assert m["q/reward_mean"] == pytest.approx((0.1 - 3.7 + 2.5 - 1.8 + 1) / 5)  # -0.38
    assert m["q/v_mean"] == pytest.approx((2 + 1 + 3 + 1 + 2) / 5)  # 1.8
    # d loss / d v(s_1) of row 0 = lambda/n * 2 r_1 (through Q(s_1, a_1)) = 0.5/5 * 2 * 0.1
    # d loss / d v(s_2) of row 0 = lambda/n * 2 (r_2 - 0.9 r_1) = 0.5/5 * 2 * (-3.7 - 0.09)
    g_logp, g_v = _grad(loss, logp, v)
    assert g_v[0, 0].item() == pytest.approx(0.02)
    assert g_v[0, 1].item() == pytest.approx(0.2 * (-3.7 - 0.09))
    assert g_v[0, 2].item() == pytest.approx(0.2 * (2.5 - 0.9 * -3.7))
    # d loss / d logp = -1/n (NLL) + lambda/n * 2 r_t
    assert g_logp[1, 0].item() == pytest.approx(-0.2 + 0.2 * -1.8)
    assert g_logp[1, 2].item() == 0.0  # padding


def test_v_after_the_last_real_token_is_zero():
    logp, v, mask = _hand()
    base, m = iq_loss(logp, v, mask, iq_lambda=0.5, gamma=0.9)
    logp2, v2, _ = _hand(v=[[2.0, 1.0, 3.0], [1.0, 2.0, 100.0]])  # garbage on the padded position
    other, m2 = iq_loss(logp2, v2, mask, iq_lambda=0.5, gamma=0.9)
    assert torch.equal(base, other) and m == m2
    for a, b in zip(_grad(base, logp, v), _grad(other, logp2, v2)):
        assert torch.equal(a, b)
    # the terminal step's reward is Q(s_T, a_T) itself: row 0 alone, r = [0.1, -3.7, 2.5]
    _, m3 = iq_loss(logp[:1], v[:1], mask[:1], iq_lambda=1.0, gamma=0.9)
    assert m3["loss/td"] == pytest.approx((0.01 + 13.69 + 6.25) / 3)


def test_truncated_rows_drop_their_last_tokens_td_term():
    logp, v, mask = _hand()
    for truncated, td in (([False, False], 24.19), ([False, True], 24.19 - 1.0), ([True, False], 24.19 - 6.25),
                          ([True, True], 24.19 - 1.0 - 6.25)):
        loss, m = iq_loss(logp, v, mask, iq_lambda=0.5, gamma=0.9, truncated=torch.tensor(truncated))
        assert m["loss/td"] == pytest.approx(td / 5), truncated
        assert m["loss/nll"] == pytest.approx(NLL)  # the token's likelihood still counts
        assert loss.item() == pytest.approx(NLL + 0.5 * td / 5)
    # the dropped token of a truncated row gets only the NLL gradient
    loss, _ = iq_loss(logp, v, mask, iq_lambda=0.5, gamma=0.9, truncated=torch.tensor([False, True]))
    assert _grad(loss, logp)[0][1, 1].item() == pytest.approx(-0.2)


# -- (d) V at every answer position ----------------------------------------------------------

@pytest.mark.parametrize("shared_prefix", [True, False])
def test_all_values_is_logsumexp_of_the_logits_at_every_position(tiny, shared_prefix):
    model, tok = tiny
    batch = _batch(tok, tok.eos_token_id)
    with torch.no_grad():
        logp, v = sequence_logprobs(model, batch, shared_prefix=shared_prefix, all_values=True)
        logp1, v1 = sequence_logprobs(model, batch, shared_prefix=shared_prefix)
        assert v.shape == batch.response_ids.shape
        for i in range(len(batch)):
            p = batch.prompt(i)
            n = int(batch.response_mask[i].sum())
            r = batch.response_ids[i, :n].tolist()
            logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1: len(p) + n - 1]  # (n, V)
            torch.testing.assert_close(v[i, :n], torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)
            want = logits.log_softmax(-1).gather(-1, torch.tensor(r)[:, None])[:, 0]
            torch.testing.assert_close(logp[i, :n], want, atol=1e-5, rtol=1e-5)
            assert not v[i, n:].any()  # zero outside the mask
    assert torch.equal(v[:, 0], v1) and torch.equal(logp, logp1)


# -- (e) micro-batches -----------------------------------------------------------------------

def test_two_halves_with_the_whole_token_count_equal_the_full_batch():
    logp, v, mask = _random(B=6, T=7, seed=3)
    truncated = torch.tensor([False, True, False, False, True, False])
    n = int(mask.sum())
    kw = {"iq_lambda": 0.3, "gamma": 0.95}
    full, _ = iq_loss(logp, v, mask, truncated=truncated, **kw)
    halves = [iq_loss(logp[s], v[s], mask[s], truncated=truncated[s], num_tokens=n, **kw)[0]
              for s in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(halves[0] + halves[1], full, atol=1e-6, rtol=1e-6)
    for a, b in zip(_grad(full, logp, v), _grad(halves[0] + halves[1], logp, v)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    mle_halves = sum(mle_loss(logp[s], mask[s], num_tokens=n)[0] for s in (slice(0, 3), slice(3, 6)))
    torch.testing.assert_close(mle_halves, mle_loss(logp, mask)[0], atol=1e-6, rtol=1e-6)


def test_metrics_are_each_micro_batchs_own_token_mean():
    """`update` averages metrics over micro-batches, so they must not be scaled by the whole
    batch's token count (a loss/nll half the true one with two micro-batches)."""
    logp, v, mask = _random(B=4, T=5, seed=1)
    n = int(mask.sum())
    _, whole = iq_loss(logp[:2], v[:2], mask[:2], iq_lambda=0.1)
    _, part = iq_loss(logp[:2], v[:2], mask[:2], iq_lambda=0.1, num_tokens=n)
    assert part == whole
    assert mle_loss(logp[:2], mask[:2], num_tokens=n)[1] == mle_loss(logp[:2], mask[:2])[1]


# -- reval pretrain --loss iq ----------------------------------------------------------------

@pytest.mark.parametrize("with_data", [False, True])
def test_pretrain_with_the_iq_loss_writes_a_loadable_model(tmp_path, with_data, capsys):
    from reval.model import load_model
    from reval.pretrain import PretrainConfig, pretrain

    extra = {}
    if with_data:
        data = tmp_path / "demos.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"{i}+1", "response": f"{i + 1}"}) + "\n" for i in range(8)))
        extra = {"data": str(data), "batch_size": 4}
    out = tmp_path / "model"
    result = pretrain(PretrainConfig(loss="iq", iq_lambda=0.5, gamma=0.9, steps=3, hidden=32, layers=2,
                                     eval_problems=4, out=out, **extra))
    model, tok = load_model(out)
    assert model.config.hidden_size == 32
    saved = json.loads((out / "pretrain.json").read_text())
    assert saved["config"]["loss"] == "iq"
    if with_data:
        assert {"loss/nll", "loss/td"} <= set(result["last_step"])
        # continue from it (--model) with plain MLE
        out2 = tmp_path / "model2"
        pretrain(PretrainConfig(model=str(out), steps=2, eval_problems=4, out=out2, **extra))
        assert load_model(out2)[0].config.hidden_size == 32
    else:
        assert 0.0 <= result["accuracy"] <= 1.0


def test_pretrain_refuses_a_size_for_an_existing_model(tmp_path):
    from reval.pretrain import PretrainConfig

    with pytest.raises(ValueError, match="--model"):
        PretrainConfig(model=str(tmp_path), hidden=32).resolved()
    with pytest.raises(ValueError, match="iq-lambda"):
        PretrainConfig(iq_lambda=-1.0).resolved()
