"""Evaluation: greedy accuracy and mean sampled accuracy (avg@k) on held-out problems."""

from __future__ import annotations

from collections.abc import Sequence

from reval.model import PROMPT_TEMPLATE, format_prompt
from reval.rollout import generate
from reval.tasks.arithmetic import extract_answer, verify


def evaluate(model, tokenizer, questions: Sequence[str], answers: Sequence[str], *,
             samples: int = 0, max_new_tokens: int = 64, temperature: float = 1.0,
             template: str | None = PROMPT_TEMPLATE, batch_size: int = 256,
             keep_items: bool = False) -> dict:
    """Greedy accuracy over all questions, plus `mean@k` over `samples` sampled answers.

    Returns `{"accuracy", "mean@k" (if samples), "items" (if keep_items)}`; accuracy is
    a fraction in [0, 1].
    """
    prompts = [format_prompt(tokenizer, q, template) for q in questions]
    correct, sampled_correct, items = 0, 0, []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        out = generate(model, tokenizer, prompts[chunk], greedy=True, max_new_tokens=max_new_tokens)
        for i, resp in enumerate(out.response_ids):
            text = tokenizer.decode(resp, skip_special_tokens=True)
            ok = verify(text, answers[start + i])
            correct += ok
            if keep_items:
                items.append({"question": questions[start + i], "answer": answers[start + i],
                              "completion": text, "extracted": extract_answer(text), "correct": ok})
        if samples:
            out = generate(model, tokenizer, prompts[chunk], samples_per_prompt=samples,
                           temperature=temperature, max_new_tokens=max_new_tokens)
            for i, resp in enumerate(out.response_ids):
                text = tokenizer.decode(resp, skip_special_tokens=True)
                sampled_correct += verify(text, answers[start + i // samples])
    result = {"accuracy": correct / max(len(prompts), 1)}
    if samples:
        result[f"mean@{samples}"] = sampled_correct / max(len(prompts) * samples, 1)
    if keep_items:
        result["items"] = items
    return result
