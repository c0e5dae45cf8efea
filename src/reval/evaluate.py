"""Evaluation: greedy accuracy and mean sampled accuracy (avg@k) on held-out problems.

The paper's protocol (method.md section 8) is avg@16: 16 sampled answers per problem,
the fraction correct, averaged over problems, each benchmark capped at 100 problems.
`reval eval` runs it over several benchmark files and prints one row per benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from reval.model import PROMPT_TEMPLATE, format_prompt
from reval.rewards import RewardFn, correctness_reward, score
from reval.rollout import generate
from reval.tasks.arithmetic import extract_answer


def evaluate(model, tokenizer, questions: Sequence[str], answers: Sequence[str], *,
             samples: int = 0, max_new_tokens: int = 64, temperature: float = 1.0,
             top_p: float = 1.0, template: str = PROMPT_TEMPLATE, chat: bool = False,
             batch_size: int = 256, keep_items: bool = False, greedy: bool = True,
             verifier: RewardFn = correctness_reward, generator=None,
             eos_token_ids: list[int] | None = None, timeout: float | None = 30.0,
             progress: str | None = None, columns: dict[str, list] | None = None,
             errors: dict[str, str] | None = None) -> dict:
    """Greedy accuracy over all questions, plus `mean@k` over `samples` sampled answers.

    An answer is correct when `verifier` (a reward function) gives it 1. `generator` is a
    rollout backend (HF or vLLM); None samples from `model` with HF `generate`. `progress`:
    show a progress bar (problems done) with this label. `columns`: more per-question values
    the verifier gets as keyword arguments (with `question` and `answer`), as in training;
    `errors` receives its first failure (see `reval.rewards.score`).
    Returns `{"accuracy" (if greedy), "mean@k" (if samples), "items" (if keep_items)}`,
    each a fraction in [0, 1].
    """
    if not greedy and not samples:
        raise ValueError("nothing to evaluate: greedy is off and samples is 0")

    def sample(prompts, **kw):
        if generator is not None:
            return generator.generate(prompts, max_new_tokens=max_new_tokens, **kw)
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                        eos_token_ids=eos_token_ids, **kw)

    def correct(responses, chunk: slice, k: int) -> tuple[list[str], list[bool]]:
        """Score the k answers to each question of `chunk`."""
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        cols = {"answer": answers[chunk], "question": questions[chunk],
                **{name: values[chunk] for name, values in (columns or {}).items()}}
        cols = {name: [v for v in values for _ in range(k)] for name, values in cols.items()}
        rewards, _ = score([verifier], texts, cols, timeout=timeout, errors=errors)
        return texts, [r is not None and r >= 1.0 for r in rewards]

    prompts = [format_prompt(tokenizer, q, template, chat) for q in questions]
    n_greedy, n_sampled, items = 0, 0, []
    bar = tqdm(total=len(prompts), desc=progress, unit="problem", disable=progress is None, dynamic_ncols=True)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        refs = answers[chunk]
        if greedy:
            texts, ok = correct(sample(prompts[chunk], greedy=True).response_ids, chunk, 1)
            n_greedy += sum(ok)
            if keep_items:
                items += [{"question": q, "answer": a, "completion": t, "extracted": extract_answer(t),
                           "correct": c} for q, a, t, c in zip(questions[chunk], refs, texts, ok)]
        if samples:
            out = sample(prompts[chunk], samples_per_prompt=samples, temperature=temperature, top_p=top_p)
            n_sampled += sum(correct(out.response_ids, chunk, samples)[1])
        bar.update(len(refs))
    bar.close()
    n = max(len(prompts), 1)
    result = {"accuracy": n_greedy / n} if greedy else {}
    if samples:
        result[f"mean@{samples}"] = n_sampled / (n * samples)
    if keep_items:
        result["items"] = items
    return result
