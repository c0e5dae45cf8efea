"""The loss path recomputes exactly the log-probs the sampler used; chunking changes nothing."""

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
