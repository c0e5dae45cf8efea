"""Multi-process training with `accelerate`: the same loop on 1 process or N GPUs.

    accelerate launch --num_processes 8 -m reval.cli train --config paper-qwen2.5-math-7b
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m reval.cli train ...

What changes with N processes (nothing changes with one):

- **Work split.** `rollout.prompts_per_round` and `buffer.capacity` are global. Each rank
  draws P / N prompts per round from its own prompt stream, generates their G answers,
  and keeps them in its own buffer shard of capacity M / N.
- **Replay buffer: sharded, never gathered.** Every rank adds the same number of
  trajectories per round and evicts FIFO, so the union of the shards is exactly the
  global FIFO buffer of capacity M. An update samples B / N trajectories uniformly from
  each shard: a stratified version of the global uniform sample (each shard contributes
  exactly its share), with no communication and no trajectory ever crossing ranks.
- **Gradients.** Each rank's loss is its local mean (trajectories, or tokens for GRPO);
  DDP / FSDP / ZeRO average gradients over ranks, which equals the global trajectory
  mean because every rank holds the same number of trajectories. For GRPO's token mean
  it is a mean of per-rank token means (as in most GRPO trainers).
- **The loss forward goes through the wrapped module.** `LogProbModule.forward` computes
  the chunked log-probs (reval.logprobs), so DDP's gradient hooks, FSDP's unsharding and
  DeepSpeed's partitioning all see the forward they expect.
- **Generation** uses the unwrapped model; under FSDP and ZeRO-3 the full parameters are
  gathered for the duration of the round's generation (`full_params`).
- **Checkpoints** are written by the main process; each rank adds its own buffer shard
  and RNG state. Resuming needs the same number of processes.
"""

from __future__ import annotations

import contextlib

import torch

from reval.logprobs import sequence_logprobs


class LogProbModule(torch.nn.Module):
    """Wraps a causal LM so that its forward is the loss's forward: (logp, V(s_1))."""

    def __init__(self, lm, chunk_size: int | None = None, shared_prefix: bool = True):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.shared_prefix = shared_prefix

    def forward(self, batch, all_values: bool = False):
        return sequence_logprobs(self.lm, batch, self.chunk_size, self.shared_prefix, all_values)


def make_accelerator(mixed_precision: str = "no"):
    """An `Accelerator` (a thin no-op wrapper in a single CPU or GPU process).

    accelerate keeps one process-wide state; it is reset (the process group is kept) so
    that one process can run several trainings with different precision (tests, benchmarks).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision)


def is_sharded(accelerator) -> bool:
    """True when parameters are partitioned across ranks (FSDP or DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3
    return False


@contextlib.contextmanager
def full_params(accelerator, wrapped):
    """Gather sharded parameters so the unwrapped model can `generate` (FSDP, ZeRO-3)."""
    from accelerate.utils import DistributedType

    if not is_sharded(accelerator):
        yield
    elif accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, recurse=True, writeback=False):
            yield
    else:  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(wrapped.parameters()), modifier_rank=None):
            yield


def all_ranks_true(accelerator, flag: bool) -> bool:
    """Logical AND of `flag` over ranks (e.g. "this step's loss was finite everywhere")."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() == accelerator.num_processes)
