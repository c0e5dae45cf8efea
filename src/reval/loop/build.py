"""The parts a run is made of, from its config: the policy (full, LoRA or Q-Adapter; from the
start or a checkpoint), the reference, the training and evaluation data, the sampler."""

from __future__ import annotations

from pathlib import Path

import torch

from reval import offline
from reval.config import TrainConfig
from reval.distributed import whole_models
from reval.checkpoint import latest_checkpoint
from reval.latent import share_frozen
from reval.model import _is_run_dir, add_lora, load_model, no_peft_deprecation_warning
from reval.qhead import attach_qadapter
from reval.reference import Reference
from reval.rollout import HFGenerator
from reval.tasks import TASKS
from reval.tasks.arithmetic import EVAL_SEED

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_for_training(cfg: TrainConfig, path: str | Path, tokenizer_path: str | Path | None = None):
    model, tokenizer = load_model(path, DTYPES[cfg.model.dtype], tokenizer_path=tokenizer_path,
                                  attn_implementation=cfg.model.attn_implementation,
                                  trust_remote_code=cfg.model.trust_remote_code)
    # No dropout anywhere: the loss compares policy and reference log-probs exactly, and
    # dropout would break ReVal's delta = 0 at the start. Then train() mode only switches
    # gradient checkpointing on (HF checkpoints layers in training mode only).
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    if cfg.model.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model, tokenizer


def load_policy(cfg: TrainConfig, ckpt: Path | None, start_path):
    """The policy (LoRA-wrapped if configured, or with a Q-Adapter head) and tokenizer, from the
    start or a checkpoint."""
    if not ckpt and (Path(start_path) / "qadapter.json").is_file():
        raise ValueError(f"{start_path} is a Q-Adapter (base model + qadapter.json): train from its base "
                         "model instead (a directory without qadapter.json / qadapter.safetensors)")
    check_latent(cfg, ckpt / "model" if ckpt else start_path)
    if cfg.model.lora_rank == 0:
        model, tokenizer = load_for_training(cfg, ckpt / "model" if ckpt else start_path)
        if cfg.algo == "qadapter":  # the base is frozen; only the residual-Q head learns
            head = model.get_output_embeddings() if ckpt else attach_qadapter(
                model, cfg.model.qadapter_hidden, cfg.loss.qadapter_alpha, cfg.loss.qadapter_alpha0)
            for module in (head.up, head.down):
                module.requires_grad_(True)
        return model, tokenizer
    # LoRA: the base weights are the reference's (they change only at a reference reset)
    base_dir = ckpt / "reference" if ckpt and (ckpt / "reference").exists() else start_path
    model, tokenizer = load_for_training(cfg, base_dir, ckpt / "model" if ckpt else None)  # reference/: weights only
    if ckpt:
        from peft import PeftModel

        with no_peft_deprecation_warning():
            model = PeftModel.from_pretrained(model, ckpt / "model", is_trainable=True)
    else:
        targets = cfg.model.lora_target_modules
        model = add_lora(model, cfg.model.lora_rank, cfg.model.lora_alpha,
                         targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
    return model, tokenizer


def check_latent(cfg: TrainConfig, path, processes: int = 1) -> None:
    """A latent-action model (`reval.latent`) trains its policy over codes with the RL algorithms that
    sample answers, on one process with HF sampling; anything else is refused here, by name."""
    path = Path(path)
    if _is_run_dir(path):  # load_model reads a run directory's newest checkpoint: check that one
        ckpt = latest_checkpoint(path)
        path = ckpt / "model" if ckpt is not None else path
    if not (path / "latent.json").is_file():
        return
    from reval.losses import ALGORITHMS

    refused = [what for what, bad in (
        (f"--algo {cfg.algo} (it learns from {ALGORITHMS[cfg.algo].data}, which carry no latent codes; use "
         "reval, tbrm, tbrm_replay or grpo)", ALGORITHMS[cfg.algo].data != "rollout" or cfg.algo == "qadapter"),
        ("--model.lora-rank (the policy is small: train it whole)", cfg.model.lora_rank > 0),
        (f"--rollout.backend {cfg.rollout.backend} (vLLM cannot play codes; use hf)", cfg.rollout.backend != "hf"),
        ("--model.gradient-checkpointing", cfg.model.gradient_checkpointing),
        (f"{processes} processes (it trains on one)", processes > 1)) if bad]
    if refused:
        raise ValueError(f"{path} is a latent-action model (latent.json), which does not support "
                         + "; ".join(refused))


def make_reference(cfg: TrainConfig, model, ckpt: Path | None, start_path, accelerator) -> Reference:
    """pi_ref: the LoRA base (adapter off), or a frozen copy of the start (or of the checkpoint's
    reference after a reset). It runs under the policy's autocast (`Reference.autocast`)."""
    if cfg.model.lora_rank or cfg.algo == "qadapter":  # the same module, adapter or head off
        return Reference(model, autocast=accelerator.autocast)
    ref_source = ckpt / "reference" if ckpt and (ckpt / "reference").exists() else start_path
    with whole_models(accelerator):  # a frozen copy on every rank, never partitioned (ZeRO-3)
        ref_copy = load_for_training(cfg, ref_source, ckpt / "model" if ckpt else None)[0].to(accelerator.device)
    return Reference(model, share_frozen(ref_copy, model), autocast=accelerator.autocast)


def datasets(cfg: TrainConfig, problems, eval_problems, kind: str = "rollout") -> tuple[list, dict[str, list]]:
    """(training problems, {benchmark name: problems}) from the task config or the overrides;
    for the offline algorithms (`kind` demonstrations / preferences) the training examples."""
    if kind != "rollout":
        train_set = offline.load_examples(cfg, kind, problems)
    if cfg.task.data is None:
        task = TASKS[cfg.task.name]
        if kind == "rollout":
            train_set = problems or task.split("train", cfg.task.num_train, seed=cfg.seed, digits=cfg.task.digits)
        n_eval = cfg.task.num_test if cfg.task.eval_split == "test" else cfg.task.num_validation
        if eval_problems is not None and not eval_problems:  # [] : no evaluation
            return train_set, {}
        evals = {cfg.task.eval_split: eval_problems or task.split(cfg.task.eval_split, n_eval, seed=EVAL_SEED,
                                                                  digits=cfg.task.digits)}  # fixed across seeds
        return train_set, evals
    from reval.data import load_problems

    fields = {"preset": cfg.task.preset, "question_field": cfg.task.question_field,
              "answer_field": cfg.task.answer_field}
    if kind != "rollout":  # the field names are the demonstrations' / pairs'; eval rows are the preset's
        fields = {"preset": cfg.task.preset}
    if kind == "rollout":
        train_set = problems or load_problems(cfg.task.data, **fields)
    if eval_problems is not None:  # [] (the Python API without an eval_dataset): no evaluation
        return train_set, {"eval": eval_problems} if eval_problems else {}
    evals = {}
    for source in cfg.task.eval_data:
        name = Path(source.split(":")[0]).stem
        evals[name if name not in evals else source] = load_problems(
            source, split="test", limit=cfg.task.eval_limit, limit_mode=cfg.task.eval_limit_mode,
            limit_seed=cfg.task.eval_limit_seed, **fields)
    return train_set, evals


def make_generator(cfg: TrainConfig, model, tokenizer, eos_ids, start_path, backend: str | None = None):
    """The sampler of `rollout.backend` (or `backend`: the asynchronous learner keeps HF generate
    for its evaluations, and the actor process builds the configured one)."""
    backend = backend or cfg.rollout.backend
    if backend == "vllm-server":
        from reval.rollout_vllm_server import VLLMServerGenerator

        return VLLMServerGenerator(cfg.rollout.vllm_server, tokenizer, eos_ids,
                                   cfg.rollout.vllm_weights_dir or cfg.run_dir / "vllm-weights")
    if backend == "vllm":
        from reval.rollout_vllm import VLLMGenerator

        # bf16 on a GPU (its usual speed / memory trade; GRPO corrects for the sampler), the policy's
        # own dtype on a CPU (vLLM's CPU build), where it then samples the policy's exact numbers
        return VLLMGenerator(str(start_path), tokenizer, dtype="bfloat16" if torch.cuda.is_available()
                             else cfg.model.dtype, seed=cfg.seed, eos_token_ids=eos_ids,
                             gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)
    return HFGenerator(model, tokenizer, eos_ids, separate_copy=backend == cfg.rollout.backend and (
        cfg.rollout.sync_every > 1 or cfg.rollout.lag > 0))



def reward_functions(cfg: TrainConfig, reward_funcs=None) -> list:
    """The run's reward functions: those passed from Python, else `task.rewards`, else the
    default (arithmetic for the embedded task, math_verify for data)."""
    from reval.rewards import resolve_rewards

    return resolve_rewards(reward_funcs or cfg.task.rewards
                           or (("arithmetic",) if cfg.task.data is None else ("math_verify",)))
