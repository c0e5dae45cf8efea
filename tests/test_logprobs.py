"""The loss path recomputes exactly the log-probs the sampler used; chunking changes nothing."""

import pytest
import torch

from reval.buffer import collate
from reval.logprobs import sequence_logprobs
from reval.rollout import generate, to_experiences


def test_recomputed_logprobs_equal_sampling_logprobs(tiny):
    model, tok = tiny
    prompts = ["Q: A box has 12 pens.\nA: ", "Q: 7\nA: "]  # different lengths: left padding
    torch.manual_seed(0)
    s = generate(model, tok, prompts, samples_per_prompt=3, max_new_tokens=12, return_logprobs=True)
    exps = to_experiences(s, [0.0] * 6, samples_per_prompt=3, version=0, round=0)
    batch = collate(exps, tok.pad_token_id)
    with torch.no_grad():
        logp, _ = sequence_logprobs(model, batch)
    recomputed = [row[m.bool()].tolist() for row, m in zip(logp, batch.response_mask)]
    for got, want in zip(recomputed, s.logprobs):
        assert len(got) == len(want) > 0
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=1e-4)


def test_v_first_is_logsumexp_of_first_response_logits(tiny):
    model, tok = tiny
    s = generate(model, tok, ["Q: 1\nA: ", "Q: 22+3\nA: "], samples_per_prompt=2, max_new_tokens=5)
    batch = collate(to_experiences(s, [1.0, 0.0, 1.0, 1.0], samples_per_prompt=2, version=0, round=0),
                    tok.pad_token_id)
    with torch.no_grad():
        _, v = sequence_logprobs(model, batch)
        want = [torch.logsumexp(model(input_ids=torch.tensor([batch.prompt(i)])).logits[0, -1], -1)
                for i in range(len(batch))]
    torch.testing.assert_close(v, torch.stack(want), atol=1e-5, rtol=1e-5)


def _replayed_batch(model, tok):
    """Answers of 4 prompts of different lengths, shuffled as a replay sample would be."""
    import random

    torch.manual_seed(0)
    prompts = ["Q: 12+3\nA: ", "Q: 5\nA: ", "Q: A box has 12 pens. Bob adds 7.\nA: ", "Q: 99+1\nA: "]
    s = generate(model, tok, prompts, samples_per_prompt=3, max_new_tokens=10)
    exps = to_experiences(s, [1.0, 0.0] * 6, samples_per_prompt=3, version=0, round=0, first_uid=0)
    random.Random(0).shuffle(exps)
    return collate(exps, tok.pad_token_id)


def test_shared_prefix_equals_concatenated_and_each_sequence_alone(tiny):
    """Prompts run once with a shared KV cache give the log-probs, V(s_1) and gradients of
    running every (prompt, answer) in full, and of each sequence alone with no padding."""
    model, tok = tiny
    batch = _replayed_batch(model, tok)
    results = []
    for shared in (True, False):
        model.zero_grad()
        logp, v = sequence_logprobs(model, batch, shared_prefix=shared)
        (logp.sum() + v.pow(2).sum()).backward()
        results.append((logp.detach(), v.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for i in range(len(batch)):
            prompt = batch.prompt(i)
            answer = batch.response_ids[i][batch.response_mask[i].bool()]
            logits = model(input_ids=torch.tensor([prompt + answer.tolist()])).logits[0].float()
            want = torch.log_softmax(logits, -1)[len(prompt) - 1: -1].gather(-1, answer[:, None])[:, 0]
            torch.testing.assert_close(results[0][0][i, : len(answer)], want, atol=1e-5, rtol=1e-5)


def test_chunked_equals_unchunked_values_and_grads(tiny):
    model, tok = tiny
    batch = _replayed_batch(model, tok)
    results = []
    for chunk in (None, 3):
        model.zero_grad()
        logp, v = sequence_logprobs(model, batch, chunk_size=chunk)
        (logp.sum() + v.sum()).backward()
        results.append((logp.detach(), v.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_shared_prefill_samples_what_num_return_sequences_samples(tiny):
    """Prefilling each prompt once and copying its cache to its G answers draws the same
    answers, for the same seed, as HF's num_return_sequences (which prefills G times)."""
    model, tok = tiny
    prompts = ["Q: 12+3\nA: ", "Q: A box has 5 pens.\nA: "]
    out = []
    for shared in (True, False):
        torch.manual_seed(3)
        out.append(generate(model, tok, prompts, samples_per_prompt=4, max_new_tokens=12, shared_prefix=shared))
    assert out[0].response_ids == out[1].response_ids and out[0].prompt_ids == out[1].prompt_ids
    assert len(set(map(tuple, out[0].response_ids))) > 1  # they are samples, not copies


# -- the fused head (reval.logprobs.fused_logprobs) --------------------------------------

def _big_vocab_batch(vocab: int, response_lengths=(9, 3, 14, 1)):
    """Random answers of different lengths to prompts of different lengths (padding both
    sides); the second row's mask is cleared, so one row lies wholly outside it."""
    from reval.rollout import Experience

    g = torch.Generator().manual_seed(1)
    exps = []
    for i, n in enumerate(response_lengths):
        ids = torch.randint(3, vocab, (5 + i + n,), generator=g).tolist()
        exps.append(Experience(tuple(ids[:5 + i]), tuple(ids[5 + i:]), reward=0.0, group_id=i, group_mean=0.0,
                               group_std=1.0, version=0, round=0, truncated=False))
    batch = collate(exps, pad_id=0)
    batch.response_mask[1] = 0
    return batch


def _vocab_model(head: str, vocab: int = 3000):
    """A 1-layer Qwen2 with `vocab` tokens; its head tied to the embeddings, untied, untied
    with a bias, or tied and frozen (as LoRA leaves it: only the hidden states need a gradient)."""
    from reval.model import build_tiny_model

    model = build_tiny_model(vocab, hidden=32, layers=1, heads=2)
    if head == "frozen":
        model.lm_head.weight.requires_grad_(False)
    elif head != "tied":
        model.config.tie_word_embeddings = False
        linear = torch.nn.Linear(32, vocab, bias=head == "bias")
        with torch.no_grad():
            linear.weight.copy_(model.lm_head.weight + 0.01 * torch.randn_like(linear.weight))
        model.lm_head = linear
    return model


def _logprobs_and_grads(model, batch, fused: bool, autocast: bool, all_values: bool, chunk: int = 4):
    """logp, V and every gradient of a loss with per-token weights on logp and V^2 on V."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logp, v = sequence_logprobs(model, batch, chunk_size=chunk, all_values=all_values, fused=fused)
    weights = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2))
    ((logp * weights).sum() + v.pow(2).sum()).backward()
    return logp.detach(), v.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("head", ["tied", "untied", "bias", "frozen"])
@pytest.mark.parametrize("all_values", [False, True])
def test_fused_head_equals_checkpointed_chunks(head, autocast, all_values):
    """Log-probs and V are bit-identical to the checkpointed chunks (fp32 and bf16 autocast).
    Gradients: fp32 to 1e-7 relative (measured; the head weight's chunk sums are added in
    another order). Under bf16 the hidden states' gradients are still equal to 1e-6 and the
    head weight's to bf16 rounding (measured <= 6e-3 of its largest entry): the checkpointed
    path adds the chunks' weight gradients in bf16 (autocast casts the weight once for all
    chunks), the fused path in fp32 (see the next test)."""
    model = _vocab_model(head)
    batch = _big_vocab_batch(3000)
    ref = _logprobs_and_grads(model, batch, fused=False, autocast=autocast, all_values=all_values)
    got = _logprobs_and_grads(model, batch, fused=True, autocast=autocast, all_values=all_values)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert (got[0][1] == 0).all() and got[0][2].ne(0).all()  # the cleared row and the longest one
    head_params = {"lm_head.weight", "lm_head.bias", "model.embed_tokens.weight"}
    for name, want in ref[2].items():
        if autocast and name in head_params:
            assert (got[2][name] - want).abs().max() <= 1e-2 * want.abs().max(), name
        else:
            torch.testing.assert_close(got[2][name], want, rtol=1e-6, atol=1e-6 * want.abs().max().item(),
                                       msg=name)


def test_fused_head_sums_chunks_in_fp32_under_autocast():
    """Under bf16 autocast the fused head weight gradient is the fp32 sum of each chunk's
    own (bf16 matmul) gradient, to 1e-6; with a single chunk every gradient is bit-identical
    to the checkpointed path's."""
    from reval.logprobs import fused_logprobs

    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 40, 32), torch.randn(3000, 32, requires_grad=True)
    targets = torch.randint(0, 3000, (3, 40))
    dlogp, dv = torch.randn(3, 40), torch.randn(3, 40)

    def grad(cols: slice, chunk: int):
        weight.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, v = fused_logprobs(hidden[:, cols], weight, None, targets[:, cols], chunk)
        ((logp * dlogp[:, cols]).sum() + (v * dv[:, cols]).sum()).backward()
        return weight.grad.double()

    per_chunk = sum(grad(slice(s, s + 4), 4) for s in range(0, 40, 4))
    torch.testing.assert_close(grad(slice(None), 4), per_chunk, rtol=1e-6, atol=1e-6)

    model, batch = _vocab_model("untied"), _big_vocab_batch(3000)
    ref = _logprobs_and_grads(model, batch, fused=False, autocast=True, all_values=True, chunk=64)
    got = _logprobs_and_grads(model, batch, fused=True, autocast=True, all_values=True, chunk=64)
    assert all(torch.equal(got[2][n], g) for n, g in ref[2].items())


def test_fused_head_without_grad_saves_nothing(monkeypatch):
    """The reference pass (no_grad) takes the fused forward but not the autograd function."""
    import reval.logprobs as lp

    model, batch = _vocab_model("tied"), _big_vocab_batch(3000)
    with torch.no_grad():
        want = sequence_logprobs(model, batch, chunk_size=4, fused=False, all_values=True)
    monkeypatch.setattr(lp._FusedLogProbs, "apply", lambda *a: pytest.fail("saved tensors without grad"))
    with torch.no_grad():
        got = sequence_logprobs(model, batch, chunk_size=4, all_values=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].grad_fn is None


@pytest.mark.parametrize("wrap", ["lora", "qadapter"])
def test_fused_head_falls_back_for_wrapped_heads(wrap, monkeypatch):
    """A peft LoRA layer on the head and Q-Adapter's residual head are called as modules
    (the checkpointed path); a plain Linear head takes the fused one."""
    import reval.logprobs as lp
    from reval.model import add_lora
    from reval.qhead import attach_qadapter

    used = []
    fused = lp.fused_logprobs
    monkeypatch.setattr(lp, "fused_logprobs", lambda *a: used.append(1) or fused(*a))
    model, batch = _vocab_model("untied"), _big_vocab_batch(3000)
    sequence_logprobs(model, batch, chunk_size=4)[0].sum().backward()
    assert used == [1]
    if wrap == "lora":
        model = add_lora(model, rank=4, alpha=8, target_modules=["q_proj", "lm_head"])
        torch.nn.init.normal_(model.base_model.model.lm_head.lora_B["default"].weight)  # B = 0 at the start
    else:
        attach_qadapter(model, width=8)
        torch.nn.init.normal_(model.lm_head.down.weight)  # Q_res = 0 at the start
    results = []
    for chunk in (4, None):
        model.zero_grad(set_to_none=True)
        logp, v = sequence_logprobs(model, batch, chunk_size=chunk)
        (logp.sum() + v.sum()).backward()
        results.append((logp.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    assert used == [1]
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
