"""Q-Adapter's residual-Q module: a head on the frozen model that changes its logits.

Q-Adapter (arXiv 2407.03856, docs/qadapter.md) reads the pre-trained model pi_base as the
soft-optimal policy of an unknown reward and learns a Q-function Q for the new preference;
the customised policy is pi(a|s) = softmax_a((Q(s, a) + alpha_0 log pi_base(a|s)) / alpha~).
The authors' adapter starts Q at the base model's own logits. We split that start off:

    Q(s, a) = (alpha~ - alpha_0) log pi_base(a|s) + Q_res(s, a)
    =>  log pi(a|s) = log_softmax_a( log pi_base(a|s) + Q_res(s, a) / alpha~ )

so the learned module Q_res starts at exactly zero and the customised policy starts exactly
at the base model, whatever alpha_0 (which then only weighs the base in the implied reward,
`reval.losses.qadapter`). `QAdapterHead` replaces the model's output projection with exactly
that: the base projection (frozen), its log-softmax, and Q_res = a small MLP of the last
hidden state whose output layer starts at zero. Because the head is the model's output
projection, generation (`reval.rollout`, `reval eval`), the loss's log-probs
(`reval.logprobs`) and the KV cache work unchanged: generation runs one forward per token.
With the residual switched off (`residual_off`) the head returns the base logits, which is
how the trainer's reference (`reval.reference.Reference`) reads log pi_base without a second
copy of the weights.

On disk a Q-Adapter model is the base model's HF directory plus `qadapter.json` (sizes and
alphas) and `qadapter.safetensors` (the head's weights); `reval.model.load_model` puts the
head back, so `reval eval --model DIR` evaluates the customised policy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

CONFIG, WEIGHTS = "qadapter.json", "qadapter.safetensors"


class QAdapterHead(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, hidden_size: int, vocab_size: int, width: int = 64,
                 alpha: float = 1.0, alpha0: float = 1.0):
        super().__init__()
        self.base = base  # the model's own output projection (frozen; may be tied to the embeddings)
        self.up = torch.nn.Linear(hidden_size, width)
        self.down = torch.nn.Linear(width, vocab_size, bias=False)
        torch.nn.init.zeros_(self.down.weight)  # Q_res = 0 at the start
        self.alpha, self.alpha0, self.width = alpha, alpha0, width
        self.residual = True

    @property
    def weight(self) -> torch.Tensor:  # HF utilities that inspect the output embeddings' dtype
        return self.base.weight

    def q_res(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., V) the residual Q-function of each next token."""
        # the head keeps its own dtype (float32) when the model runs in bfloat16
        return self.down(torch.nn.functional.silu(self.up(hidden.to(self.up.weight.dtype)))).float()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.base(hidden).float()  # (..., V)
        if not self.residual:
            return logits
        return torch.log_softmax(logits, -1) + self.q_res(hidden) / self.alpha

    @contextlib.contextmanager
    def residual_off(self):
        """Inside: the head is the base model's projection (log-probs of pi_base)."""
        before, self.residual = self.residual, False
        try:
            yield
        finally:
            self.residual = before  # nested uses leave the outer one off

    def config(self) -> dict:
        return {"width": self.width, "alpha": self.alpha, "alpha0": self.alpha0}


def is_qadapter(model) -> bool:
    return isinstance(getattr(model, "get_output_embeddings", lambda: None)(), QAdapterHead)


def attach_qadapter(model, width: int = 64, alpha: float = 1.0, alpha0: float = 1.0) -> QAdapterHead:
    """Freeze `model` and give it a zero-initialised residual-Q head (trainable); returns the head."""
    model.requires_grad_(False)
    base = model.get_output_embeddings()
    head = QAdapterHead(base, model.config.hidden_size, base.weight.shape[0], width, alpha, alpha0)
    head.to(device=base.weight.device)
    model.set_output_embeddings(head)
    head.up.requires_grad_(True)
    head.down.requires_grad_(True)
    return head


def save_qadapter(model, directory: Path, state_dict: dict | None = None, **kwargs) -> None:
    """The base model (a loadable HF directory) plus the head's config and weights.

    `state_dict`: the model's full weights gathered from FSDP / ZeRO-3 shards (the live
    modules then hold only shards); it is split into the head's tensors and the base's,
    whose output projection gets back its plain name (`lm_head.base.weight` -> `lm_head.weight`).
    """
    from safetensors.torch import save_file

    head = model.get_output_embeddings()
    directory = Path(directory)
    if state_dict is None:
        own = {k: v for k, v in head.state_dict().items() if not k.startswith("base.")}
    else:
        prefix = next(n for n, m in model.named_modules() if m is head) + "."  # e.g. "lm_head."
        base = prefix + "base."
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and not k.startswith(base)}
        kwargs["state_dict"] = {(prefix + k[len(base):] if k.startswith(base) else k): v
                                for k, v in state_dict.items() if not k.startswith(prefix) or k.startswith(base)}
    model.set_output_embeddings(head.base)  # the plain model, as it was loaded
    try:
        model.save_pretrained(directory, **kwargs)
    finally:
        model.set_output_embeddings(head)
    (directory / CONFIG).write_text(json.dumps(head.config(), indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in own.items()}, str(directory / WEIGHTS))


def load_qadapter(model, directory: Path) -> QAdapterHead:
    """Put back the head saved in `directory` (see `save_qadapter`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        cfg = json.loads((directory / CONFIG).read_text())
        weights = load_file(str(directory / WEIGHTS))
        head = attach_qadapter(model, int(cfg["width"]), float(cfg["alpha"]), float(cfg["alpha0"]))
        missing = {k for k in head.state_dict() if not k.startswith("base.")} - set(weights)
        if missing:
            raise KeyError(f"no tensors {sorted(missing)}")
        head.load_state_dict(weights, strict=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise OSError(f"{directory}: the Q-Adapter head ({CONFIG}, {WEIGHTS}) is unreadable "
                      f"({type(e).__name__}: {e}); write it again with reval train --algo qadapter") from None
    model.requires_grad_(False)
    return head
