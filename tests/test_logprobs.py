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
    s = generate(model, tok, ["Q: 1\nA: "], samples_per_prompt=2, max_new_tokens=5)
    batch = collate(to_experiences(s, [1.0, 0.0], samples_per_prompt=2, version=0, round=0), tok.pad_token_id)
    with torch.no_grad():
        _, v = sequence_logprobs(model, batch)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    want = torch.logsumexp(logits[torch.arange(2), batch.first_index], -1)
    torch.testing.assert_close(v, want, atol=1e-5, rtol=1e-5)


def test_chunked_equals_unchunked_values_and_grads(tiny):
    model, tok = tiny
    s = generate(model, tok, ["Q: 12+3\nA: ", "Q: 5\nA: "], samples_per_prompt=2, max_new_tokens=10)
    batch = collate(to_experiences(s, [1.0, 0.0, 1.0, 0.0], samples_per_prompt=2, version=0, round=0),
                    tok.pad_token_id)
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
