"""Evaluation: greedy accuracy and mean sampled accuracy (mean@k, the paper's avg@k) on held-out problems.

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


TRUNCATION_WARNING = 0.1  # a share of answers cut at the budget above which every report warns


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
    Returns `{"accuracy" (if greedy), "mean@k" (if samples), "truncated", "items" (if
    keep_items)}`, each a fraction in [0, 1]. mean@k is the paper's avg@k: the share of
    correct answers among k per question, averaged over questions. `truncated` is the share
    of all answers (greedy and sampled) cut at `max_new_tokens` without an end of sequence:
    such an answer is usually wrong, so a high share means the budget is too small, not the
    model. Each item holds its greedy completion and, with `samples`, its sampled ones.
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
    n_greedy, n_sampled, n_cut, items = 0, 0, 0, []
    bar = tqdm(total=len(prompts), desc=progress, unit="problem", disable=progress is None, dynamic_ncols=True)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        refs = answers[chunk]
        chunk_items = [{"question": q, "answer": a} for q, a in zip(questions[chunk], refs)]
        if greedy:
            out = sample(prompts[chunk], greedy=True)
            texts, ok = correct(out.response_ids, chunk, 1)
            n_greedy, n_cut = n_greedy + sum(ok), n_cut + sum(out.truncated)
            for item, t, c, cut in zip(chunk_items, texts, ok, out.truncated):
                item.update(completion=t, extracted=extract_answer(t), correct=c, truncated=cut)
        if samples:
            out = sample(prompts[chunk], samples_per_prompt=samples, temperature=temperature, top_p=top_p)
            texts, ok = correct(out.response_ids, chunk, samples)
            n_sampled, n_cut = n_sampled + sum(ok), n_cut + sum(out.truncated)
            for i, item in enumerate(chunk_items):
                rows = range(i * samples, (i + 1) * samples)
                item["samples"] = [{"completion": texts[j], "correct": ok[j], "truncated": out.truncated[j]}
                                   for j in rows]
        if keep_items:
            items += chunk_items
        bar.update(len(refs))
    bar.close()
    n = max(len(prompts), 1)
    result = {"accuracy": n_greedy / n} if greedy else {}
    if samples:
        result[f"mean@{samples}"] = n_sampled / (n * samples)
    result["truncated"] = n_cut / (n * (int(greedy) + samples))
    if keep_items:
        result["items"] = items
    return result


def truncation_warning(what: str, share: float, budget: int, setting: str) -> str | None:
    """The warning for `what` when more than `TRUNCATION_WARNING` of its answers were cut at
    `budget` tokens (`setting`: the flag or field that raises it); None below the threshold."""
    if share <= TRUNCATION_WARNING:
        return None
    return (f"WARNING: {what}: {100 * share:.0f}% of answers hit the answer budget of {budget} tokens without "
            f"ending, and count as wrong; the accuracy measures the budget more than the model. Raise "
            f"{setting}.")
