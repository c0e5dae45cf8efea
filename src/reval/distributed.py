"""Multi-process training with `accelerate`: the same loop on 1 process or N GPUs.

    accelerate launch --num_processes 8 -m reval.cli train --config paper-qwen2.5-math-7b
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m reval.cli train ...
    accelerate launch --config_file configs/accelerate/fsdp-cpu.yaml -m reval.cli train ...  # 2 CPU processes

docs/distributed.md: launching DDP, FSDP2 and ZeRO-3, what was run and measured on CPUs.

What changes with N processes (nothing changes with one):

- **Work split.** `rollout.prompts_per_round` and `buffer.capacity` are global. Each rank
  draws P / N prompts per round from its own prompt stream, generates their G answers,
  and keeps them in its own buffer shard of capacity M / N.
- **Replay buffer: sharded, never gathered.** Every rank adds the same number of
  trajectories per round and evicts FIFO, so the union of the shards is exactly the
  global FIFO buffer of capacity M. An update samples B / N trajectories uniformly from
  each shard: a stratified version of the global uniform sample (each shard contributes
  exactly its share), with no communication and no trajectory ever crossing ranks.
  A prioritised or age-decayed draw (`buffer.sampling`) is likewise per shard: each rank's
  probabilities and importance weights are its own shard's.
- **Gradients.** Each rank's loss is its local mean (trajectories, or tokens for GRPO);
  DDP / FSDP / ZeRO average gradients over ranks, which equals the global trajectory
  mean because every rank holds the same number of trajectories. For GRPO's token mean
  it is a mean of per-rank token means (as in most GRPO trainers).
- **The loss forward goes through the wrapped module.** `LogProbModule.forward` computes
  the chunked log-probs (reval.logprobs), so DDP's gradient hooks, FSDP's unsharding and
  DeepSpeed's partitioning all see the forward they expect.
- **Generation** uses the unwrapped model; under FSDP2 and ZeRO-3 the full parameters are
  gathered for the duration of the round's generation (`full_params`).
- **Checkpoints** are written by the main process (under FSDP2 / ZeRO-3 the full weights
  are gathered for it); each rank adds its own buffer shard, RNG state and optimizer state
  (its shard of it under FSDP2 / ZeRO-3). Resuming needs the same number of processes.
"""

from __future__ import annotations

import contextlib
import os

import torch

from reval.logprobs import sequence_logprobs


class LogProbModule(torch.nn.Module):
    """Wraps a causal LM so that its forward is the loss's forward: (logp, V(s_1))."""

    def __init__(self, lm, chunk_size: int | None = None, shared_prefix: bool = True):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.shared_prefix = shared_prefix

    @property
    def _no_split_modules(self):
        """The LM's layer classes, which FSDP's TRANSFORMER_BASED_WRAP makes one unit each
        (accelerate reads them from the module it prepares; without them the whole model is
        one unit, gathered whole at every forward)."""
        return getattr(self.lm, "_no_split_modules", None)

    def forward(self, batch, all_values: bool = False):
        logp, v = sequence_logprobs(self.lm, batch, self.chunk_size, self.shared_prefix, all_values)
        # V(s_1) is a view of the (B, H) values: FSDP2 hooks the root's outputs for backward and
        # warns that an in-place op on a view output would bypass that hook; a (B,) copy is free
        return logp, v.clone()


def make_accelerator(mixed_precision: str = "no"):
    """An `Accelerator` (a thin no-op wrapper in a single CPU or GPU process).

    accelerate keeps one process-wide state; it is reset (the process group is kept) so
    that one process can run several trainings with different precision (tests, benchmarks).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(reset_partial_state=False)
    # N processes (torchrun / accelerate launch) on a machine without an accelerator: gloo on
    # the CPU. accelerate only does so with ACCELERATE_USE_CPU=1 (`--cpu`, which starts one
    # process); without it every process would train alone as a world of one.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.accelerator.current_accelerator() is None
    handlers = []
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # DeepSpeed on the CPU (its CPU accelerator): accelerate drops DeepSpeed when told
        # cpu=True, so name the backend instead; DeepSpeed then starts gloo itself
        from accelerate.utils import InitProcessGroupKwargs

        cpu, handlers = False, [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu, kwargs_handlers=handlers)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and \
            os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _fsdp_on_cpu(accelerator)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """Turn FSDP2 on for CPU processes over gloo, which accelerate 1.16 never does by itself:
    `AcceleratorState` picks FSDP only for GPU-like process groups (state.py), and `accelerate
    launch` with `--cpu` starts a single process. `fully_shard` itself runs on CPU DTensors,
    so only accelerate's state needs the plugin (read from the FSDP_* variables that `accelerate
    launch --config_file configs/accelerate/fsdp-cpu.yaml` sets)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on the CPU needs fsdp_version: 2 in the accelerate config (FSDP1 needs a GPU)")
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # both shared states: every later `AcceleratorState()` copies the process state's type over its own
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def prepare(accelerator, module: LogProbModule, optimizer, max_grad_norm: float = 1.0):
    """`accelerator.prepare(module, optimizer)`, keeping every wrapper on one numerical path.

    Under mixed precision a single process and DDP run the forward under autocast on the
    fp32 weights, and so does the frozen reference (`Reference.autocast`). FSDP2 would
    instead all-gather bf16 copies of the weights (its `MixedPrecisionPolicy`) and run
    without autocast: other numbers, so at theta = ref the log-ratio is no longer 0 (a mean
    of 4e-4 per token on the tiny test model). Here FSDP2 gathers the fp32 weights and the
    root's forward runs under the same autocast. (DeepSpeed's bf16 casts the weights itself
    and is not matched: ZeRO has run in fp32 only, docs/distributed.md.)

    DeepSpeed's config gets what it cannot know without a dataloader (a micro-batch size)
    and the run's `max_grad_norm`, as it clips inside its own step.
    """
    autocast = accelerator.is_fsdp2 and accelerator.mixed_precision != "no"
    if autocast:
        accelerator.state.fsdp_plugin.mixed_precision_policy = None  # fp32 all-gathers and gradients
    if accelerator.distributed_type == "DEEPSPEED":
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        # required without a dataloader; only DeepSpeed's own sample count reads it (the
        # micro-batches are `update`'s, their step boundary `micro_batch_sync`'s)
        ds["train_micro_batch_size_per_gpu"] = 1
        ds["gradient_clipping"] = max_grad_norm  # DeepSpeed clips inside its step: optim.max_grad_norm
    policy, optimizer = accelerator.prepare(module, optimizer)
    if autocast:
        forward = policy.forward

        def autocast_forward(*args, **kwargs):
            with accelerator.autocast():
                return forward(*args, **kwargs)

        policy.forward = autocast_forward  # FSDP2's hooks sit on __call__, around this
    return policy, optimizer


@contextlib.contextmanager
def micro_batch_sync(accelerator, policy, last: bool):
    """One backward of an update's micro-batches: gradients are reduced, or the step taken,
    after the last only. DDP skips its all-reduce before it (`no_sync`); DeepSpeed, whose
    engine steps inside `backward` at each gradient-accumulation boundary, is told that only
    the last one is (accelerate passes it `sync_gradients`). FSDP2 reduce-scatters every
    micro-batch (skipping it would hold the full unsharded gradients until the last)."""
    from accelerate.utils import DistributedType

    if accelerator is None or last:
        yield
    elif accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        with accelerator.no_sync(policy):
            yield
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.sync_gradients = False
        try:
            yield
        finally:
            accelerator.sync_gradients = True
    else:
        yield


@contextlib.contextmanager
def whole_models(accelerator):
    """Models loaded in this block are whole. Under ZeRO-3 accelerate registers its DeepSpeed
    config with transformers, which then partitions every model it loads (zero.Init); the
    frozen reference copy, which DeepSpeed never wraps, would have empty weights."""
    from accelerate.utils import DistributedType

    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED \
        else None
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


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
    elif accelerator.is_fsdp2:
        with _unsharded(wrapped):
            yield
    elif accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(wrapped, recurse=True, writeback=False):
            yield
    else:  # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(wrapped.parameters()), modifier_rank=None):
            yield


@contextlib.contextmanager
def _unsharded(root):
    """FSDP2: every unit's full weights registered on its module, for the whole block.

    `generate` calls the decoder, not the root `LogProbModule`, and ranks take different
    numbers of decoding steps, so FSDP2's own per-forward all-gathers would pair up wrongly
    (hang). Here each unit is gathered once, up front, and no forward inside reshards (its
    pre-forward finds the weights gathered and communicates nothing); `reset_iter_state`
    reshards them all at the end and clears the forward order that the decoding steps added,
    which backward prefetching would otherwise read. No writeback: the block reads only.
    Memory: the full weights for the block, as a single process holds them.
    """
    from torch.distributed.fsdp import FSDPModule

    # FSDP2 takes the first module to run forward as its root: make it the root before
    # `generate` runs a decoder layer first (private, as FSDP2 has no public lazy init)
    root._get_fsdp_state()._lazy_init()
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    groups = [g for m in units for g in m._get_fsdp_state()._fsdp_param_groups]
    reshard_after = [g.post_forward_mesh_info for g in groups]  # what set_reshard_after_forward sets
    root.set_reshard_after_forward(False)
    try:
        for handle in [m.unshard(async_op=True) for m in units]:
            handle.wait()
        yield
    finally:
        for g, info in zip(groups, reshard_after):
            g.post_forward_mesh_info = info
        root.reset_iter_state()


def to_local(state):
    """`state` (nested dicts / lists of tensors) with each DTensor replaced by this rank's shard.

    FSDP2's optimizer state (AdamW's moments) is DTensors; a checkpoint stores each rank's
    shard as a plain tensor (safetensors, no pickle), and `load_optimizer_state` puts it back."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.to_local()
    if isinstance(state, dict):
        return {k: to_local(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_local(v) for v in state)
    return state


def optimizer_state(optimizer) -> dict:
    """This rank's optimizer state as plain tensors and values, for a safetensors checkpoint.

    FSDP2: the DTensor moments become this rank's shards (`to_local`). DeepSpeed ZeRO: its
    optimizer's own state (this rank's fp32 weight partition and the torch optimizer's state on
    it) with the loss-scaler object as its attributes."""
    state = to_local(optimizer.state_dict())
    if "loss_scaler" in state:  # DeepSpeed ZeRO
        state = {**state, "loss_scaler": dict(vars(state["loss_scaler"])), "zero_stage": int(state["zero_stage"])}
    return state


def load_optimizer_state(optimizer, state: dict) -> None:
    """Load what `optimizer_state` saved. FSDP2: each shard is wrapped back as a DTensor laid
    out like its parameter, so AdamW steps on DTensors as before the checkpoint. DeepSpeed
    ZeRO: its own loader, given this rank's state and its loss scaler back."""
    from torch.distributed.tensor import DTensor

    if "loss_scaler" in state:  # DeepSpeed ZeRO (accelerate's wrapper around its optimizer)
        zero = optimizer.optimizer
        vars(zero.loss_scaler).update(state["loss_scaler"])
        state = {**state, "loss_scaler": zero.loss_scaler}
        zero.load_state_dict([state] * torch.distributed.get_world_size())  # it reads its own rank's entry
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = dict(state["state"])
    for i, p in enumerate(params):
        if isinstance(p, DTensor) and i in per_param:
            per_param[i] = {k: DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                                  stride=p.stride())
                            if torch.is_tensor(v) and v.dim() > 0 else v for k, v in per_param[i].items()}
    optimizer.load_state_dict({**state, "state": per_param})


def all_ranks_true(accelerator, flag: bool) -> bool:
    """Logical AND of `flag` over ranks (e.g. "this step's loss was finite everywhere")."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() == accelerator.num_processes)
