"""The reference policy pi_ref: a frozen copy, or the base model under a disabled LoRA adapter.

ReVal and TBRM need log pi_ref and V_ref (method.md section 3) at every update. Two ways to
hold pi_ref, picked by how the policy is trained:

- full fine-tuning: a second, frozen copy of the starting weights. A reference reset
  (method.md section 5) copies the policy's weights into it in place.
- LoRA (peft): no second copy. The policy is base + adapter, so the reference is the same
  module run with the adapter disabled. A reset merges the adapter into the base weights
  and re-initialises the adapter (B = 0), so policy and reference coincide again; the
  optimizer's moments for the adapter are cleared, since they belonged to the old adapter.

Nothing is cached: `logprobs` recomputes from the current reference every time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from reval.logprobs import sequence_logprobs
from reval.model import is_peft


class Reference:
    def __init__(self, policy, frozen_copy=None):
        """`frozen_copy` for full fine-tuning; None when `policy` is a peft LoRA model."""
        if frozen_copy is None and not is_peft(policy):
            raise ValueError("a full fine-tuning reference needs a frozen copy of the weights")
        self.policy = policy
        self.copy = frozen_copy.eval().requires_grad_(False) if frozen_copy is not None else None

    @torch.no_grad()
    def logprobs(self, batch, chunk_size: int | None = None):
        """(logp, v_first) under pi_ref, as `sequence_logprobs` returns them."""
        if self.copy is not None:
            return sequence_logprobs(self.copy, batch, chunk_size)
        with self.policy.disable_adapter():
            return sequence_logprobs(self.policy, batch, chunk_size)

    @torch.no_grad()
    def reset(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make pi_ref equal to the current policy, in place."""
        if self.copy is not None:
            for p_ref, p in zip(self.copy.state_dict().values(), self.policy.state_dict().values()):
                p_ref.copy_(p)
            return
        for layer in _lora_layers(self.policy):
            for name in list(layer.active_adapters):
                layer.merge(adapter_names=[name])  # base weight += scale * B @ A
                layer.merged_adapters.clear()  # the delta now belongs to the base for good
                layer.reset_lora_parameters(name, init_lora_weights=True)  # B = 0: delta is 0
                if optimizer is not None:
                    for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                        optimizer.state.pop(p, None)

    def save(self, directory: Path) -> None:
        """Write pi_ref as a loadable HF model directory."""
        if self.copy is not None:
            self.copy.save_pretrained(directory)
        else:
            save_base_model(self.policy, directory)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@torch.no_grad()
def save_base_model(peft_model, directory: Path) -> None:
    """Save the base weights of a LoRA model (adapter excluded) as a plain HF checkpoint."""
    base = peft_model.get_base_model()
    state = {name.replace(".base_layer", ""): t for name, t in base.state_dict().items()
             if "lora_" not in name}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # save_pretrained with an explicit state dict: handles tied embeddings and sharding
    base.save_pretrained(directory, state_dict=state)
