"""The training loop: rounds of generate -> score -> store -> K updates -> evaluate.

    reval train --algo reval --rounds 40 --out runs/my-run
    reval train --resume runs/my-run                 # from any directory; --rounds N: N in all

One round (blocks below come in the same order as the package's files):
  1. task      draw P training prompts
  2. rollout   sample G answers per prompt with the current policy (KV cache)
  3. rewards   score each answer; group statistics while the group is together
  4. buffer    add the round's trajectories to the FIFO replay buffer
  5. updates   K optimizer updates; the first on the fresh batch, the others on a sample of
               the buffer, uniform or by `buffer.sampling` (on-policy GRPO and TBRM reuse the
               fresh batch instead).
               The policy's log-probs and V are recomputed at every update; the reference's
               are cached per answer until a reset makes them stale (`RefCache`).
  6. reference copy the policy into the reference every `ref_reset_every` rounds (or updates)
  7. eval / log / checkpoint

Single process and plain PyTorch by default, so `breakpoint()` works anywhere. The same
loop runs under `accelerate launch` on N GPUs (reval.distributed: each rank generates
P / N prompts and keeps its own buffer shard), with LoRA (reval.reference) and with vLLM
rollouts (reval.rollout_vllm); none of them is a second code path.

The code is in `reval.loop`: the actor (steps 1-3), the learner (4-6), the run (7, and
everything around: resume, checkpoints, stopping rules) and the schedule that drives them.
"""

from reval.loop.build import DTYPES
from reval.loop.learner import UNDO_MAX_PARAMS, micro_batches, old_logprobs, sampler_logprobs, update
from reval.loop.run import train

__all__ = ["DTYPES", "UNDO_MAX_PARAMS", "micro_batches", "old_logprobs", "sampler_logprobs", "train", "update"]
