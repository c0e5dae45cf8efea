"""What the loop says when something is off: the texts of its warnings and of the errors that
stop a run, each naming the setting to change. Kept apart so the loop reads as the loop.

Rounds are numbered from 1 in every message, as in metrics.jsonl ("round": 1 is the first
round); a checkpoint `round-00000N` holds the run after round N."""

from __future__ import annotations

import sys

import torch

from reval.config import TrainConfig

def inputs_message(saved: dict, now: dict) -> str:
    parts = [f"{k}: the run had {saved.get(k, 'none (the config)')}, now {now.get(k, 'none (the config)')}"
             for k in ("problems", "rewards") if saved.get(k) != now.get(k)]
    return ("cannot resume: this run was given its data or reward functions from Python (ReValTrainer), "
            "and they differ now (" + "; ".join(parts) + "). Resume it the same way, with the same "
            "train_dataset and reward_funcs: trainer.train(resume_from_checkpoint=True)")


NO_SIGNAL_ROUNDS = 3  # rounds in a row without a learning signal before the run says so


def no_signal_message(cfg: TrainConfig, prompt: str, reward_names, rec: dict, rnd: int) -> str:
    """Why a run has learnt nothing for `NO_SIGNAL_ROUNDS` rounds up to round `rnd` (1-based):
    every group scored alike."""
    what = "every answer got reward 0" if rec["rollout/reward_mean"] == 0 else \
        "the answers to each prompt all got the same reward"
    return (f"\nWARNING: rounds {rnd + 1 - NO_SIGNAL_ROUNDS}-{rnd}: {what}, so there is nothing to learn "
            f"(mean reward {rec['rollout/reward_mean']:.2f}, {100 * rec['rollout/truncated_frac']:.0f}% of answers "
            f"cut at max_new_tokens). Likely causes: the prompt (task.prompt = {prompt!r}) does not ask for "
            f"what the reward ({', '.join(reward_names)}) reads; the reward function or the answer column does not "
            f"match the data; or rollout.max_new_tokens = {cfg.max_new_tokens} cuts the answers short. Look at a "
            "few completions with `reval eval --out` and check them by hand.\n")


def unscored_message(cfg: TrainConfig, reward_names, columns: dict, rounds: int, rnd: int, failures: int,
                      answers: int) -> str:
    """Why a run stops after `rollout.max_unscored_rounds` rounds without a single reward; `rnd`
    is the (1-based) round that stopped it."""
    where = f"{rounds} rounds in a row (rounds {rnd - rounds + 1}-{rnd}; round {rnd}: " if rounds > 1 else \
        f"round {rnd} ("
    return (f"no answer could be scored in {where}{failures} reward failures among {answers} answers); "
            f"stopping. Likely causes: the reward function "
            f"({', '.join(reward_names)}) raises or returns non-numbers; rollout.reward_timeout = "
            f"{cfg.rollout.reward_timeout:g}s is too short; or the data lacks a column it needs (it gets "
            f"{', '.join(columns)}). Try it on a few answers; rollout.max_unscored_rounds sets how many "
            "such rounds stop the run.")


def nothing_to_run_message(run_dir, done: int, rounds: int) -> str:
    """A resume asked for no more rounds than the run has: said, not an error (exit 0)."""
    return (f"the run in {run_dir} already has {done} rounds (--rounds {rounds}): nothing to run. To continue "
            f"it, resume with --rounds above {done} (--rounds counts all the run's rounds, not the ones to add)")


def failed_start_message(run_dir, logged: int) -> str:
    """A fresh start in a directory whose run logged rounds but stopped before its first checkpoint."""
    return (f"run directory {run_dir} holds a run that logged {logged} round{'s' if logged != 1 else ''} but has "
            f"no checkpoint (it stopped before its first one), so there is nothing to continue. To start again "
            f"in it, delete it first (rm -r {run_dir}), or choose another --out (Python: output_dir); resuming it "
            f"(--resume {run_dir}, or resume_from_checkpoint=True) also starts it over")


def out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def memory_message(cfg: TrainConfig, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return (f"ran out of memory ({first}). The batch settings need less: optim.micro_batch_size = "
            f"{cfg.optim.micro_batch_size} rows per forward/backward (only memory, never the maths), "
            f"rollout.prompts_per_round x samples_per_prompt = {cfg.batch_size} answers generated at once, "
            f"rollout.max_new_tokens = {cfg.max_new_tokens}; --model.gradient-checkpointing and "
            "--model.logprob-chunk 512 also help. Completed checkpoints are intact: change a memory "
            "setting and --resume (micro_batch_size and logprob_chunk may change on resume)")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

