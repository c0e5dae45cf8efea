"""The reference policy pi_ref: a frozen copy, or the base model under a disabled LoRA adapter.

ReVal and TBRM need log pi_ref and V_ref (method.md section 3) at every update. Two ways to
hold pi_ref, picked by how the policy is trained:

- full fine-tuning: a second, frozen copy of the starting weights. A reference reset
  (method.md section 5) copies the policy's weights into it in place.
- Q-Adapter (`reval.qhead`): the frozen model under its residual-Q head, head switched off.
- LoRA (peft): no second copy. The policy is base + adapter, so the reference is the same
  module run with the adapter disabled. A reset merges the adapter into the base weights
  and re-initialises the adapter (B = 0), so policy and reference coincide again; the
  optimizer's moments for the adapter are cleared, since they belonged to the old adapter.

`logprobs` computes from the current reference; `RefCache` keeps the results of stored
trajectories until a reset makes them stale, so replayed answers need no reference pass.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from reval.logprobs import sequence_logprobs
from reval.model import is_peft
from reval.qhead import is_qadapter


class Reference:
    def __init__(self, policy, frozen_copy=None, autocast=contextlib.nullcontext):
        """`frozen_copy` for full fine-tuning; None when `policy` is a peft LoRA model.

        `autocast` is the context the policy's forward runs under (accelerate's mixed
        precision: `accelerator.autocast`). The reference must take exactly the same
        numerical path, or at theta = ref the log-ratio is not 0 and the calibrated start
        is lost: under bf16 autocast a reference computed in fp32 differs by a biased
        amount that grows with the answer length.
        """
        if frozen_copy is None and not is_peft(policy) and not is_qadapter(policy):
            raise ValueError("a full fine-tuning reference needs a frozen copy of the weights")
        self.policy = policy
        self.copy = frozen_copy.eval().requires_grad_(False) if frozen_copy is not None else None
        self.autocast = autocast
        # FSDP2 (set by the training loop): the sharded root module whose forward is
        # `sequence_logprobs(policy, ...)`. The adapter-off pass goes through it, so that its hooks
        # gather every unit's weights, those the root holds itself included.
        self.root = None

    @torch.no_grad()
    def logprobs(self, batch, chunk_size: int | None = None, shared_prefix: bool = True):
        """(logp, v_first) under pi_ref, as `sequence_logprobs` returns them (float32).

        Pass the policy's own `chunk_size` and `shared_prefix`: the same path, the same numbers.
        """
        with self.autocast():
            if self.copy is not None:
                logp, v = sequence_logprobs(self.copy, batch, chunk_size, shared_prefix)
            elif is_qadapter(self.policy):  # the frozen base under the residual-Q head
                with self.policy.get_output_embeddings().residual_off():
                    logp, v = self._policy_logprobs(batch, chunk_size, shared_prefix)
            else:
                with self.policy.disable_adapter():
                    logp, v = self._policy_logprobs(batch, chunk_size, shared_prefix)
        return logp.float(), v.float()

    def _policy_logprobs(self, batch, chunk_size, shared_prefix):
        if self.root is not None:  # the root's own chunk_size and shared_prefix: the policy's, as passed
            return self.root(batch)
        return sequence_logprobs(self.policy, batch, chunk_size, shared_prefix)

    @torch.no_grad()
    def reset(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make pi_ref equal to the current policy, in place."""
        if self.copy is not None:
            from torch.distributed.tensor import DTensor

            # ZeRO-3: the policy's partitioned weights gathered for the copy
            with _gathered([p for p in self.policy.parameters() if hasattr(p, "ds_id")]):
                for p_ref, p in zip(self.copy.state_dict().values(), self.policy.state_dict().values()):
                    # FSDP2: a sharded weight is all-gathered (every rank resets together, in this order)
                    p_ref.copy_(p.full_tensor() if isinstance(p, DTensor) else p)
            return
        for layer in _lora_layers(self.policy):
            for name in list(layer.active_adapters):
                layer.merge(adapter_names=[name])  # base weight += scale * B @ A
                layer.merged_adapters.clear()  # the delta now belongs to the base for good
                layer.reset_lora_parameters(name, init_lora_weights=True)  # B = 0: delta is 0
                if optimizer is not None:  # the moments belonged to the old adapter
                    for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                        # zeroed in place (moments and step count): AdamW's fresh state exactly, and
                        # still a state, so a checkpoint taken right after a reset verifies
                        for v in optimizer.state.get(p, {}).values():
                            if torch.is_tensor(v):
                                v.zero_()

    def save(self, directory: Path, policy_state_dict: dict | None = None) -> None:
        """Write pi_ref as a loadable HF model directory. `policy_state_dict`: the policy's full
        weights where they are sharded (FSDP2 / ZeRO-3, gathered on this rank), from which a LoRA
        base is taken; a frozen copy is never sharded."""
        if self.copy is not None:
            self.copy.save_pretrained(directory)
        else:
            save_base_model(self.policy, directory, policy_state_dict)


class RefCache:
    """log pi_ref of each response token and V_ref(s_1) of stored trajectories, by uid.

    The reference's values for a trajectory only change when the reference does (a reset),
    so each entry carries the reference version it was computed under, and a lookup at
    another version misses (method.md section 5). A miss for any row of a micro-batch
    recomputes the whole micro-batch, in the same micro-batch the policy sees, so at
    theta = ref the log-ratio stays exactly 0. Entries of trajectories that left the
    replay buffer are dropped with `keep`.

    A hit equals a fresh reference pass to float rounding, not bit for bit: the cached pass
    ran in another micro-batch (other padding, other shapes). In fp32 that is ~1e-6 per
    token; under bf16 autocast ~1e-3 per token (unbiased rounding noise). `loss.ref_cache
    = False` recomputes instead.
    """

    def __init__(self):
        self._entries: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # uid -> (version, (H,), ())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, uids: torch.Tensor, version: int, H: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """((B, H) ref log-probs, (B,) V_ref) if every uid is cached at `version`, else None."""
        found = [self._entries.get(u) for u in uids.tolist()]
        if not found or any(f is None or f[0] != version for f in found):
            return None
        logp = torch.zeros(len(found), H)
        for i, (_, lp, _) in enumerate(found):
            logp[i, : len(lp)] = lp
        return logp, torch.stack([f[2] for f in found])

    def put(self, uids: torch.Tensor, logp: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            version: int) -> None:
        lengths = mask.sum(1).long().tolist()
        logp, v = logp.detach().float().cpu(), v.detach().float().cpu()  # one device-to-host copy
        for i, u in enumerate(uids.tolist()):
            if u >= 0:
                self._entries[u] = (version, logp[i, : lengths[i]].clone(), v[i].clone())

    def keep(self, uids) -> None:
        """Drop every entry whose uid is not in `uids` (evicted from the buffer)."""
        live = set(uids)
        self._entries = {u: e for u, e in self._entries.items() if u in live}

    def state_dict(self) -> dict:
        """Flat tensors (log-probs concatenated), so a checkpoint stores them in safetensors."""
        uids = list(self._entries)
        entries = [self._entries[u] for u in uids]
        return {"uid": torch.tensor(uids, dtype=torch.long),
                "version": torch.tensor([e[0] for e in entries], dtype=torch.long),
                "length": torch.tensor([len(e[1]) for e in entries], dtype=torch.long),
                "logp": torch.cat([e[1] for e in entries]) if entries else torch.zeros(0),
                "v": torch.stack([e[2] for e in entries]) if entries else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        if "entries" in state:  # the pre-safetensors layout
            self._entries = dict(state["entries"])
            return
        logps = torch.split(state["logp"], state["length"].tolist())
        self._entries = {u: (ver, lp.clone(), v.clone()) for u, ver, lp, v in
                         zip(state["uid"].tolist(), state["version"].tolist(), logps, state["v"])}


def _gathered(params: list):
    """DeepSpeed ZeRO-3's partitioned parameters, whole for the block (none: nothing to do)."""
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def save_base_model(peft_model, directory: Path, state_dict: dict | None = None) -> None:
    """Save the base weights of a LoRA model (adapter excluded) as a plain HF checkpoint;
    from `state_dict` (the peft model's, keys `base_model.model.*`) if given."""
    base = peft_model.get_base_model()
    state = base.state_dict() if state_dict is None else \
        {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
    state = {name.replace(".base_layer", ""): t for name, t in state.items() if "lora_" not in name}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # save_pretrained with an explicit state dict: handles tied embeddings and sharding
    base.save_pretrained(directory, state_dict=state)
