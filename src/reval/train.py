"""The training loop: rounds of generate -> score -> store -> K updates -> evaluate.

    reval train --algo reval --rounds 40 --out runs/my-run
    reval train --resume runs/my-run

One round (blocks below come in the same order as the package's files):
  1. task      draw P training prompts
  2. rollout   sample G answers per prompt with the current policy (KV cache)
  3. rewards   score each answer; group statistics while the group is together
  4. buffer    add the round's trajectories to the FIFO replay buffer
  5. updates   K optimizer updates; the first on the fresh batch, the others on a uniform
               sample of the buffer (on-policy GRPO and TBRM reuse the fresh batch instead).
               The policy's log-probs and V are recomputed at every update; the reference's
               are cached per answer until a reset makes them stale (`RefCache`).
  6. reference copy the policy into the reference every `ref_reset_every` rounds (or updates)
  7. eval / log / checkpoint

Single process and plain PyTorch by default, so `breakpoint()` works anywhere. The same
loop runs under `accelerate launch` on N GPUs (reval.distributed: each rank generates
P / N prompts and keeps its own buffer shard), with LoRA (reval.reference) and with vLLM
rollouts (reval.rollout_vllm); none of them is a second code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from reval.buffer import Batch, ReplayBuffer, collate
from reval.checkpoint import (CheckpointError, RunLock, atomic_write_text, clear_staging, find_resumable,
                              latest_checkpoint, rng_state, save_checkpoint, set_rng_state, verify_checkpoint)
from reval.config import TrainConfig
from reval.data import extra_columns
from reval.distributed import (LogProbModule, all_ranks_true, full_params, is_sharded, load_optimizer_state,
                               make_accelerator, micro_batch_sync, optimizer_state, prepare, to_local,
                               whole_models)
from reval.evaluate import evaluate
from reval.logprobs import sequence_logprobs
from reval.losses import ALGORITHMS
from reval.metrics import MetricsLogger, read_metrics, tracker_names
from reval import offline
from reval.model import (add_lora, auto_prompt, default_model_path, eos_token_ids, format_prompt, load_model,
                         prompts_too_long, resolve_template, use_chat_template)
from reval.offline import ROWS_PER_EXAMPLE
from reval.qhead import attach_qadapter
from reval.reference import RefCache, Reference
from reval.rewards import resolve_rewards, reward_name, score
from reval.rollout import HFGenerator, to_experiences
from reval.tasks import TASKS
from reval.tasks.arithmetic import EVAL_SEED

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def update(policy, reference, optimizer, batch: Batch, cfg: TrainConfig,
           old_logp: list[torch.Tensor] | None = None, accelerator=None,
           ref_cache: RefCache | None = None, ref_version: int = 0,
           sampler_logp: list[torch.Tensor] | None = None) -> dict:
    """One optimizer step on `batch`, accumulated over micro-batches.

    `policy` is a `LogProbModule` (possibly wrapped by DDP / FSDP / DeepSpeed), `reference`
    a `Reference` (or None), `old_logp` GRPO's pi_old per micro-batch (`old_logprobs`),
    `sampler_logp` the sampler's log-probs per micro-batch when it is not the policy.
    Each micro-batch loss is normalised by the whole batch's trajectory (or token) count,
    so the summed gradient equals the full-batch gradient whatever the micro-batch size.
    Reference log-probs come from `ref_cache` when every row of a micro-batch is cached at
    `ref_version`, else from a reference pass that runs before the policy's forward, so
    the two graphs are never alive at once. Returns metrics, with `perf/skipped` = 1 if the
    step was skipped because the loss or gradient was not finite, or undone because it made
    a weight non-finite (on any rank; the weights and optimizer state are restored).
    """
    algo = ALGORITHMS[cfg.algo]
    device = accelerator.device if accelerator is not None else batch.response_ids.device
    rows = ROWS_PER_EXAMPLE[algo.data]  # 2: a preference pair's two answers are adjacent rows
    tokens = int(batch.response_mask.sum())
    denom = tokens if algo.per_token else len(batch) // rows
    optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {"perf/ref_cache_hits": 0.0} if algo.needs_reference else {}
    total_loss = 0.0
    micros = micro_batches(batch, max(cfg.optim.micro_batch_size // rows, 1) * rows)  # whole pairs
    for i, micro in enumerate(micros):
        micro = micro.to(device)
        t = {"mask": micro.response_mask, "reward": micro.reward, "truncated": micro.truncated,
             "group_mean": micro.group_mean, "group_std": micro.group_std, "batch_tokens": tokens}
        if algo.needs_reference:
            hit = ref_cache.get(micro.uid, ref_version, micro.response_ids.shape[1]) if ref_cache is not None \
                else None
            if accelerator is not None and not all_ranks_true(accelerator, hit is not None):
                hit = None  # every rank runs the reference pass, or none does (its collectives must match)
            if hit is None:
                hit = reference.logprobs(micro, cfg.model.logprob_chunk, cfg.shared_prefix)
                if ref_cache is not None:
                    ref_cache.put(micro.uid, *hit, micro.response_mask, ref_version)
            else:
                sums["perf/ref_cache_hits"] += len(micro) / len(batch)
            t["ref_logp"], t["ref_v"] = (x.to(device) for x in hit)
        # gradients all-reduced (DDP) or the step taken (DeepSpeed) after the last micro-batch only
        with micro_batch_sync(accelerator, policy, last=i == len(micros) - 1):
            t["logp"], t["v"] = policy(micro, True) if algo.all_values else policy(micro)
            if algo.needs_old_logp:  # pi_old: the sampling policy (no grad); equals pi_theta on the 1st update
                t["old_logp"] = old_logp[i].to(device) if old_logp is not None else t["logp"].detach()
                if sampler_logp is not None:
                    t["sampler_logp"] = sampler_logp[i].to(device)
            loss, metrics = algo.compute(t, cfg.loss, denom)
            accelerator.backward(loss) if accelerator is not None else loss.backward()
        total_loss += loss.item()
        for k, v in metrics.items():  # max over micro-batches, else a size-weighted mean
            if k.endswith("_max_abs"):
                sums[k] = max(sums.get(k, 0.0), v)
            else:
                sums[k] = sums.get(k, 0.0) + v * len(micro) / len(batch)
    params = [p for p in policy.parameters() if p.requires_grad]
    if accelerator is not None:
        grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
    grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32)
    finite = math.isfinite(total_loss) and torch.isfinite(grad_norm).item()
    if accelerator is not None:
        finite = all_ranks_true(accelerator, finite)  # every rank steps, or none does
    if finite:
        # A finite gradient can still give non-finite weights (a huge step, a custom
        # optimizer): keep a CPU copy to undo such a step, as if it had been skipped.
        # (DeepSpeed steps inside backward and partitions the weights: not checked there.)
        # The copy costs 3x the trainable weights in host memory (weights + AdamW moments), so
        # past UNDO_MAX_PARAMS a bad step stops the run instead (resume from a checkpoint).
        check = accelerator is None or accelerator.distributed_type != "DEEPSPEED"
        undo = check and sum(p.numel() for p in params) <= UNDO_MAX_PARAMS
        if check and accelerator is not None:
            undo = all_ranks_true(accelerator, undo)  # shards differ in size: every rank decides alike
        saved = _snapshot(params, optimizer) if undo else None
        optimizer.step()
        if check:
            finite = _all_finite(params)
            if accelerator is not None:
                finite = all_ranks_true(accelerator, finite)  # every rank undoes it, or none does
            if not finite and saved is None:
                raise FloatingPointError(
                    "an optimizer step made the weights non-finite (the loss and gradient were finite); "
                    f"with more than {UNDO_MAX_PARAMS:.0e} trainable weights the step is not undone, so the "
                    "run stops before anything is saved. Resume from the last checkpoint "
                    "(reval train --resume DIR) with a lower optim.lr")
            if not finite:
                _restore(params, optimizer, saved)
    optimizer.zero_grad(set_to_none=True)
    return {**sums, "loss/total": total_loss, "loss/grad_norm": grad_norm.item(),
            "perf/skipped": 0.0 if finite else 1.0}


UNDO_MAX_PARAMS = 200_000_000  # trainable weights up to which a non-finite step is undone (2.4 GB copy)


def _snapshot(params: list[torch.Tensor], optimizer) -> tuple[list[torch.Tensor], list[dict]]:
    """CPU copies of the trainable weights and of their optimizer state (empty before the first step);
    under FSDP2 of this rank's shards (each rank undoes its own part of the step)."""
    states = [dict(optimizer.state[p]) if p in optimizer.state else {} for p in params]
    tensors = [to_local(p.detach()) for p in params] + [to_local(v) for st in states for v in st.values()
                                                         if torch.is_tensor(v)]
    copies = [torch.empty_like(t, device="cpu") for t in tensors]
    torch._foreach_copy_(copies, tensors)  # one batched copy: half the time of a copy per tensor
    it = iter(copies[len(params):])
    return copies[:len(params)], [{k: next(it) if torch.is_tensor(v) else v for k, v in st.items()} for st in states]


def _all_finite(params: list[torch.Tensor]) -> bool:
    """No NaN or inf in any weight: a sum per tensor is non-finite if an element is (and is
    only otherwise past 3e38 in total); 6x cheaper than `isfinite` per element."""
    return not params or bool(torch.stack([to_local(p.detach()).sum(dtype=torch.float32)
                                           for p in params]).isfinite().all())  # FSDP2: this rank's shards


@torch.no_grad()
def _restore(params: list[torch.Tensor], optimizer, saved: tuple[list[torch.Tensor], list[dict]]) -> None:
    """Put back the weights and optimizer state of `_snapshot`: the step never happened."""
    for p, weight, state in zip(params, *saved):
        to_local(p).copy_(weight)  # FSDP2: the shard, in place
        if not state:
            optimizer.state.pop(p, None)
        for k, v in state.items():
            if torch.is_tensor(v):
                to_local(optimizer.state[p][k]).copy_(v)
            else:
                optimizer.state[p][k] = v


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """The micro-batches of `batch` (rows in order), each trimmed to its own prompts and lengths."""
    return [batch.slice(start, start + size) for start in range(0, len(batch), size)]


@torch.no_grad()
def sampler_logprobs(generator, samples, batch: Batch, cfg: TrainConfig, first_uid: int,
                     accelerator) -> list[torch.Tensor]:
    """log pi_sampler of each answer token, per micro-batch: what the sampler returned (vLLM),
    or a teacher-forced pass of the HF sampler's own (stale) copy of the weights, which takes
    the policy's numerical path, so a freshly synced sampler gives weights of exactly 1."""
    micros = micro_batches(batch, cfg.optim.micro_batch_size)
    if samples.logprobs is None:
        with accelerator.autocast():
            return [sequence_logprobs(generator.model, m.to(accelerator.device), cfg.model.logprob_chunk,
                                      cfg.shared_prefix)[0].float() for m in micros]
    out = []
    for m in micros:  # answer i of the round has uid first_uid + i
        logp = torch.zeros(m.response_ids.shape)
        for row, uid in enumerate(m.uid.tolist()):
            values = samples.logprobs[uid - first_uid]
            logp[row, : len(values)] = torch.tensor(values)
        out.append(logp)
    return out


@torch.no_grad()
def old_logprobs(policy, batch: Batch, cfg: TrainConfig, device) -> list[torch.Tensor]:
    """GRPO's pi_old for PPO-style reuse: the policy's log-probs per micro-batch, before any update
    of the round (the same micro-batches as the updates, so the first ratio is exactly 1)."""
    return [policy(micro.to(device))[0] for micro in micro_batches(batch, cfg.optim.micro_batch_size)]


def _load(cfg: TrainConfig, path: str | Path, tokenizer_path: str | Path | None = None):
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


def _load_policy(cfg: TrainConfig, ckpt: Path | None, start_path):
    """The policy (LoRA-wrapped if configured, or with a Q-Adapter head) and tokenizer, from the
    start or a checkpoint."""
    if not ckpt and (Path(start_path) / "qadapter.json").is_file():
        raise ValueError(f"{start_path} is a Q-Adapter (base model + qadapter.json): train from its base "
                         "model instead (a directory without qadapter.json / qadapter.safetensors)")
    if cfg.model.lora_rank == 0:
        model, tokenizer = _load(cfg, ckpt / "model" if ckpt else start_path)
        if cfg.algo == "qadapter":  # the base is frozen; only the residual-Q head learns
            head = model.get_output_embeddings() if ckpt else attach_qadapter(
                model, cfg.model.qadapter_hidden, cfg.loss.qadapter_alpha, cfg.loss.qadapter_alpha0)
            for module in (head.up, head.down):
                module.requires_grad_(True)
        return model, tokenizer
    # LoRA: the base weights are the reference's (they change only at a reference reset)
    base_dir = ckpt / "reference" if ckpt and (ckpt / "reference").exists() else start_path
    model, tokenizer = _load(cfg, base_dir, ckpt / "model" if ckpt else None)  # reference/: weights only
    if ckpt:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, ckpt / "model", is_trainable=True)
    else:
        targets = cfg.model.lora_target_modules
        model = add_lora(model, cfg.model.lora_rank, cfg.model.lora_alpha,
                         targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
    if cfg.model.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need grads
    return model, tokenizer


def _make_reference(cfg: TrainConfig, model, ckpt: Path | None, start_path, accelerator) -> Reference:
    """pi_ref: the LoRA base (adapter off), or a frozen copy of the start (or of the checkpoint's
    reference after a reset). It runs under the policy's autocast (`Reference.autocast`)."""
    if cfg.model.lora_rank or cfg.algo == "qadapter":  # the same module, adapter or head off
        return Reference(model, autocast=accelerator.autocast)
    ref_source = ckpt / "reference" if ckpt and (ckpt / "reference").exists() else start_path
    with whole_models(accelerator):  # a frozen copy on every rank, never partitioned (ZeRO-3)
        ref_copy = _load(cfg, ref_source, ckpt / "model" if ckpt else None)[0].to(accelerator.device)
    return Reference(model, ref_copy, autocast=accelerator.autocast)


def _datasets(cfg: TrainConfig, problems, eval_problems, kind: str = "rollout") -> tuple[list, dict[str, list]]:
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


def _make_generator(cfg: TrainConfig, model, tokenizer, eos_ids, start_path):
    if cfg.rollout.backend == "vllm":
        from reval.rollout_vllm import VLLMGenerator

        # bf16 on a GPU (its usual speed / memory trade; GRPO corrects for the sampler), the policy's
        # own dtype on a CPU (vLLM's CPU build), where it then samples the policy's exact numbers
        return VLLMGenerator(str(start_path), tokenizer, dtype="bfloat16" if torch.cuda.is_available()
                             else cfg.model.dtype, seed=cfg.seed, eos_token_ids=eos_ids,
                             gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)
    return HFGenerator(model, tokenizer, eos_ids, separate_copy=cfg.rollout.sync_every > 1)


def train(cfg: TrainConfig, resume: bool = False, *, problems: list | None = None,
          eval_problems: list | None = None, should_stop: Callable[[dict], bool] | None = None,
          reward_funcs: list | None = None) -> dict:
    """Run (or resume) training; returns the final evaluation and counters.

    `reward_funcs` (callables, or names as in `task.rewards`) replaces `task.rewards`; the
    Python API (`reval.ReValTrainer`) passes its callables here. Pass them again on resume.

    For studies that need other data than the task config describes (the benchmark's
    one-prompt setting): `problems` replaces the training split, `eval_problems` the
    evaluation split (objects with `.question` and `.answer`), and `should_stop` is
    called with every evaluation record and ends the run after that round when it
    returns True. None of the three is saved in checkpoints: pass them again on resume.
    """
    cfg.validate()
    accelerator = make_accelerator(cfg.model.mixed_precision)
    for name, value in (("rollout.prompts_per_round", cfg.rollout.prompts_per_round),
                        ("buffer.capacity", cfg.buffer.capacity)):
        if value % accelerator.num_processes:
            raise ValueError(f"{name} = {value} must be divisible by the number of processes "
                             f"({accelerator.num_processes})")
    # one process per run directory: two would mix their metrics and checkpoints
    with RunLock(cfg.run_dir) if accelerator.is_main_process else contextlib.nullcontext():
        try:
            return _train(cfg, accelerator, resume, problems, eval_problems, should_stop, reward_funcs)
        except (torch.OutOfMemoryError, RuntimeError) as e:  # torch's allocators, GPU and CPU
            if not _out_of_memory(e):
                raise
            raise MemoryError(_memory_message(cfg, e)) from None


def _out_of_memory(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _memory_message(cfg: TrainConfig, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return (f"ran out of memory ({first}). The batch settings need less: optim.micro_batch_size = "
            f"{cfg.optim.micro_batch_size} rows per forward/backward (only memory, never the maths), "
            f"rollout.prompts_per_round x samples_per_prompt = {cfg.batch_size} answers generated at once, "
            f"rollout.max_new_tokens = {cfg.max_new_tokens}; --model.gradient-checkpointing and "
            "--model.logprob-chunk 512 also help. Completed checkpoints are intact: change a memory "
            "setting and --resume (micro_batch_size and logprob_chunk may change on resume)")


def _train(cfg: TrainConfig, accelerator, resume: bool, problems, eval_problems, should_stop,
           reward_funcs) -> dict:
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    run_dir = cfg.run_dir
    ckpt, state = _choose_checkpoint(run_dir, accelerator) if resume else (None, None)
    if state is not None:
        cfg.check_resumable_from(TrainConfig.from_saved(state["config"]))
        if state["world_size"] != world:
            raise ValueError(f"cannot resume: the run used {state['world_size']} processes, "
                             f"now {world}; resume with the same number")
    elif resume:  # killed before its first checkpoint: start the run over
        if main:
            print(f"no complete checkpoint in {run_dir / 'checkpoints'}; starting the run from scratch")
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    elif (run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir):
        raise ValueError(f"run directory {run_dir} already holds a run; continue it with "
                         f"--resume {run_dir}, or choose another --out")
    if main:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    algo = ALGORITHMS[cfg.algo]

    tracker_names(cfg.report_to)  # a tracker asked for but not installed: said before the model loads

    # -- data, before any model is loaded (a bad row is refused in seconds) -----------------
    offline_data = algo.data != "rollout"
    train_set, eval_sets = _datasets(cfg, problems, eval_problems, algo.data)
    inputs = _inputs(problems, reward_funcs)
    if state is not None and state.get("inputs", inputs) != inputs:
        raise ValueError(_inputs_message(state["inputs"], inputs))
    if len(train_set) < cfg.rollout.prompts_per_round // world:
        raise ValueError(f"the training data has {len(train_set)} examples, fewer than rollout.prompts_per_round "
                         f"= {cfg.rollout.prompts_per_round} drawn each round; lower it or add data")

    # -- model, reference, optimizer ------------------------------------------------------
    torch.manual_seed(cfg.seed)
    start_path = cfg.model.path or default_model_path(cfg.task.name)
    model, tokenizer = _load_policy(cfg, ckpt, start_path)
    reference = _make_reference(cfg, model, ckpt, start_path, accelerator) if algo.needs_reference else None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    # the loss's forward goes through the (DDP / FSDP / DeepSpeed) wrapper
    policy, optimizer = prepare(accelerator, LogProbModule(model, cfg.model.logprob_chunk, cfg.shared_prefix),
                                optimizer, cfg.optim.max_grad_norm)
    model = accelerator.unwrap_model(policy).lm
    if reference is not None:
        reference.policy = model
        if accelerator.is_fsdp2:  # a LoRA / Q-Adapter reference pass enters through FSDP2's root
            reference.root = policy
    buffer = ReplayBuffer(cfg.buffer.capacity // world)  # this rank's shard (reval.distributed)
    # reference values of stored answers, reused while the reference is unchanged: worth it
    # when an answer is used more than once (replay, or K > 1)
    ref_cache = RefCache() if algo.needs_reference and cfg.loss.ref_cache and (
        algo.replay or cfg.updates_per_round > 1) else None
    # rank 0 keeps the single-process streams, so 1-process runs are unchanged
    rngs = {"prompts": random.Random(cfg.seed + 7919 * rank), "buffer": random.Random(cfg.seed + 1 + 7919 * rank)}

    # -- prompts, rewards -----------------------------------------------------------------
    chat = use_chat_template(tokenizer, cfg.model.chat_template)
    embedded = cfg.task.data is None and problems is None
    prompt = cfg.task.prompt if cfg.task.prompt != "auto" else auto_prompt(chat, embedded=embedded)
    template = resolve_template(prompt)
    reward_fns = resolve_rewards(reward_funcs or cfg.task.rewards
                                 or (("arithmetic",) if cfg.task.data is None else ("math_verify",)))
    reward_names = [reward_name(fn) for fn in reward_fns]
    reward_errors: dict[str, str] = {}  # the first failure of each reward function, shown once
    verifier = reward_fns[0]
    eos_ids = eos_token_ids(model, tokenizer)
    if offline_data and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which ends every demonstration and answer; "
                         "set tokenizer.eos_token in the model directory")
    if offline_data:
        long = offline.too_long(train_set, tokenizer, template=template, chat=chat,
                                context=model.config.max_position_embeddings)
        if long:
            raise ValueError(f"training example {long[0]} is {long[1]} tokens with its prompt, more than the "
                             f"model's context of {model.config.max_position_embeddings}; shorten or drop it")
    too_long = [] if offline_data else prompts_too_long(model, tokenizer, [p.question for p in train_set],
                                                        cfg.max_new_tokens, template, chat)
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"training prompt {i} is {n} tokens ({len(too_long)} such prompts); with "
                         f"rollout.max_new_tokens={cfg.max_new_tokens} it exceeds the model's "
                         f"context of {model.config.max_position_embeddings}")
    generator = _make_generator(cfg, model, tokenizer, eos_ids, start_path)
    # GRPO's pi_old must be corrected towards the sampler when the sampler is not the policy
    correct_sampler = algo.needs_old_logp and cfg.loss.sampler_weight_cap > 0 and (
        cfg.rollout.sync_every > 1 or cfg.rollout.backend == "vllm")
    prompts_per_rank = cfg.rollout.prompts_per_round // world
    batch_per_rank = prompts_per_rank * ROWS_PER_EXAMPLE[algo.data] if offline_data else cfg.batch_size // world
    embedded_task = TASKS[cfg.task.name] if offline_data and cfg.task.data is None else None

    counters = {"round": 0, "updates": 0, "samples": 0, "seconds": 0.0, "ref_version": 0,
                "sampler_version": 0}
    # consecutive skipped updates, rounds without a scored answer, rounds without a learning
    # signal: checkpointed, so a resumed run stops or warns where the uninterrupted one would
    streaks = {"bad_updates": 0, "unscored_rounds": 0, "no_signal_rounds": 0}
    logger_start = True
    if state is not None:
        load_optimizer_state(optimizer, state["optimizer"])  # FSDP2: shards back into DTensors
        buffer.load_state_dict(state["buffer"])
        if ref_cache is not None and "ref_cache" in state:  # older checkpoints: recomputed on use
            ref_cache.load_state_dict(state["ref_cache"])
        set_rng_state(state["rng"], rngs)
        counters = {"sampler_version": state["counters"]["updates"], **state["counters"]}
        streaks.update(state.get("streaks", {}))
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", counters["round"])
        logger_start = False

    def sync_sampler() -> None:
        """Push the policy's weights to the sampler (vLLM, or the HF sampler's own copy)."""
        with full_params(accelerator, policy):
            generator.sync_weights(model)
        counters["sampler_version"] = counters["updates"]

    if counters["sampler_version"] != counters["updates"] or cfg.rollout.backend == "vllm":
        sync_sampler()  # a resumed or fresh vLLM sampler starts from the policy
    logger = MetricsLogger(run_dir, cfg.report_to, cfg.to_dict()) if main else None

    def run_eval() -> dict:
        t0 = time.time()
        rec = {"round": counters["round"], "samples": counters["samples"], "seconds": counters["seconds"]}
        results = {}
        seen = len(reward_errors)
        if cfg.rollout.backend == "vllm" and counters["sampler_version"] != counters["updates"]:
            sync_sampler()  # evaluate the policy, not the weights the engine sampled this round with
        with full_params(accelerator, policy):
            for name, problems_ in eval_sets.items():  # every rank evaluates; rank 0 logs
                results[name] = evaluate(
                    model, tokenizer, [p.question for p in problems_], [p.answer for p in problems_],
                    samples=cfg.eval.samples, max_new_tokens=cfg.max_new_tokens,
                    temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, template=template,
                    chat=chat, verifier=verifier, eos_token_ids=eos_ids,
                    generator=generator if cfg.rollout.backend == "vllm" else None,
                    columns=extra_columns(problems_), errors=reward_errors)
        if main:
            _report_reward_errors(reward_errors, seen, "evaluation", "such answers count as wrong")
        if cfg.task.data is None:  # the embedded task: eval/accuracy, eval/mean@k
            rec.update({f"eval/{k}": v for k, v in next(iter(results.values())).items()})
        elif results:  # benchmarks: eval/<name>/<metric> and their average, as the paper reports
            for name, res in results.items():
                rec.update({f"eval/{name}/{k}": v for k, v in res.items()})
            for k in next(iter(results.values())):
                rec[f"eval/{k}"] = sum(r[k] for r in results.values()) / len(results)
        rec["perf/eval_seconds"] = time.time() - t0
        if logger is not None:
            logger.log(rec)
        return rec

    def save() -> None:
        per_rank = {"optimizer": optimizer_state(optimizer), "buffer": buffer.state_dict(),
                    "buffer_size": len(buffer), "rng": rng_state(rngs)}
        if ref_cache is not None:  # saved, so a resumed run uses the very same numbers
            per_rank["ref_cache"] = ref_cache.state_dict()
        _checkpoint(accelerator, policy, run_dir, cfg, model, tokenizer, reference, per_rank, counters,
                    {"streaks": dict(streaks), "inputs": inputs})

    last_eval = run_eval() if logger_start and eval_sets else {}
    bar = tqdm(total=cfg.rounds, initial=counters["round"], desc=f"{cfg.algo}",
               disable=not (cfg.progress and main), dynamic_ncols=True)
    with _DeferredInterrupt() as interrupt:
        while counters["round"] < cfg.rounds:
            rnd = counters["round"]
            t_round = time.time()
            if offline_data:  # 1-4. the round's examples from the data (reval.offline)
                examples = rngs["prompts"].sample(train_set, prompts_per_rank)
                fresh = offline.to_experiences(
                    examples, tokenizer, template=template, chat=chat, eos_id=tokenizer.eos_token_id,
                    version=counters["updates"], round=rnd, first_group_id=(rnd * world + rank) * prompts_per_rank,
                    first_uid=(rnd * world + rank) * batch_per_rank, task=embedded_task, rng=rngs["prompts"])
                counters["samples"] += len(examples) * world
                t_gen = 0.0
            else:
                # 1. task: this round's prompts (P / N on each of N ranks)
                problems = rngs["prompts"].sample(train_set, prompts_per_rank)
                prompts = [format_prompt(tokenizer, p.question, template, chat) for p in problems]
                # 2. rollout: the generation seed depends only on (seed, round, rank) -> reproducible on resume
                seed = cfg.seed * 1_000_003 + rnd + 7919 * rank
                torch.manual_seed(seed)
                if rnd % cfg.rollout.sync_every == 0 and counters["sampler_version"] != counters["updates"]:
                    sync_sampler()
                sampler_lag = counters["updates"] - counters["sampler_version"]  # updates the sampler is behind
                G = cfg.rollout.samples_per_prompt
                with full_params(accelerator, policy) if cfg.rollout.backend == "hf" else contextlib.nullcontext():
                    samples = generator.generate(prompts, samples_per_prompt=G, temperature=cfg.rollout.temperature,
                                                 top_p=cfg.rollout.top_p, max_new_tokens=cfg.max_new_tokens, seed=seed,
                                                 return_logprobs=correct_sampler and cfg.rollout.backend == "vllm")
                t_gen = time.time() - t_round
                # 3. rewards
                completions = tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
                columns = _reward_columns(problems, G)
                seen = len(reward_errors)
                rewards, reward_failures = score(reward_fns, completions, columns,
                                                 weights=cfg.task.reward_weights or None,
                                                 timeout=cfg.rollout.reward_timeout, errors=reward_errors)
                if main:
                    _report_reward_errors(reward_errors, seen, f"round {rnd + 1}",
                                          "such answers are skipped and counted in rollout/reward_failures")
                # nothing scored, on any rank: a broken reward function or data, not bad luck
                unscored = all_ranks_true(accelerator, all(r is None for r in rewards))
                streaks["unscored_rounds"] = streaks["unscored_rounds"] + 1 if unscored else 0
                if streaks["unscored_rounds"] >= cfg.rollout.max_unscored_rounds:
                    raise ValueError(_unscored_message(cfg, reward_names, columns, streaks["unscored_rounds"], rnd,
                                                       reward_failures, len(rewards)))
                for i, trunc in enumerate(samples.truncated):
                    if trunc and rewards[i] is not None:
                        rewards[i] = None if cfg.loss.drop_truncated else 0.0  # no EOS: reward 0
                first_uid = (rnd * world + rank) * batch_per_rank
                fresh = to_experiences(samples, rewards, samples_per_prompt=G, version=counters["sampler_version"],
                                       round=rnd, first_group_id=(rnd * world + rank) * prompts_per_rank,
                                       first_uid=first_uid)
                counters["samples"] += len(completions) * world
                # 4. buffer
                if algo.replay:
                    buffer.add(fresh)
            # 5. updates
            t_upd = time.time()
            upd_metrics: list[dict] = []
            fresh_batch = collate(fresh, tokenizer.pad_token_id) if fresh else None
            old_logp = sampler_logp = None
            if algo.needs_old_logp and cfg.updates_per_round > 1 and fresh_batch is not None:
                old_logp = old_logprobs(policy, fresh_batch, cfg, accelerator.device)
            if correct_sampler and fresh_batch is not None:
                sampler_logp = sampler_logprobs(generator, samples, fresh_batch, cfg, first_uid, accelerator)
            for k in range(cfg.updates_per_round):
                if not algo.replay or (k == 0 and cfg.buffer.first_update_fresh):
                    batch = fresh_batch
                elif len(buffer):
                    batch = collate(buffer.sample(batch_per_rank, rngs["buffer"]), tokenizer.pad_token_id)
                else:
                    batch = None
                if not all_ranks_true(accelerator, batch is not None):
                    continue  # every answer was dropped (e.g. all truncated): nothing to learn
                m = update(policy, reference, optimizer, batch, cfg, old_logp, accelerator, ref_cache,
                           counters["ref_version"], sampler_logp)
                streaks["bad_updates"] = bad_updates = streaks["bad_updates"] + 1 if m["perf/skipped"] else 0
                if bad_updates >= cfg.optim.max_bad_updates:
                    last = latest_checkpoint(run_dir)
                    raise FloatingPointError(
                        f"{bad_updates} updates in a row had a non-finite loss, gradient or weights "
                        f"(round {rnd}); stopping. Last good checkpoint: {last or 'none'}. "
                        "Lower optim.lr or raise loss.beta, then resume or restart.")
                if not offline_data:  # the data of an offline run has no policy version
                    m["buffer/staleness_mean"] = (counters["updates"] - batch.version.float()).mean().item()
                    m["buffer/staleness_max"] = float((counters["updates"] - batch.version).max())
                upd_metrics.append(m)
                if m["perf/skipped"]:
                    continue  # the weights did not change: same policy version, no reset
                counters["updates"] += 1
                if cfg.rollout.sync_every == 1 and cfg.rollout.backend == "hf":
                    counters["sampler_version"] = counters["updates"]  # samples from the policy itself
                if cfg.loss.ref_reset_unit == "updates":
                    _maybe_reset(reference, optimizer, cfg, counters, counters["updates"])
            # 6. reference reset (unit: rounds, the paper's, or updates, just above)
            if cfg.loss.ref_reset_unit == "rounds":
                _maybe_reset(reference, optimizer, cfg, counters, rnd + 1)
            if ref_cache is not None:
                ref_cache.keep(buffer.uids())  # evicted (or, on-policy, used up) answers leave the cache
            t_upd = time.time() - t_upd
            counters["seconds"] += time.time() - t_round
            counters["round"] += 1

            # 7. log / eval / checkpoint
            rec = _round_record(counters, fresh, upd_metrics, t_gen, t_upd) if offline_data else _round_record(
                counters, fresh, upd_metrics, t_gen, t_upd, samples, rewards, reward_failures, len(buffer) * world,
                sampler_lag)
            if logger is not None:  # rank 0's rollout statistics stand for all ranks
                logger.log(rec)
            if not offline_data:  # no signal: every group's answers alike (one answer per prompt: every answer alike)
                G = cfg.rollout.samples_per_prompt
                flat = rec["rollout/groups_all_same"] == 1.0 if G > 1 else \
                    len({x for x in rewards if x is not None}) <= 1
                streaks["no_signal_rounds"] = streaks["no_signal_rounds"] + 1 if flat else 0
                if main and streaks["no_signal_rounds"] == NO_SIGNAL_ROUNDS:
                    _say(_no_signal_message(cfg, prompt, reward_names, rec, rnd))
            done = counters["round"] == cfg.rounds
            if eval_sets and (done or (cfg.eval.every and counters["round"] % cfg.eval.every == 0)):
                last_eval = run_eval()
                if should_stop is not None and should_stop(last_eval):
                    done = True
            if done or (cfg.checkpoint_every and counters["round"] % cfg.checkpoint_every == 0):
                save()
            bar.update(1)
            acc = last_eval.get("eval/accuracy", last_eval.get(f"eval/mean@{cfg.eval.samples}", float("nan")))
            shown = {"loss": rec.get("loss/total", float("nan"))} if offline_data else {"reward": rec["rollout/reward_mean"]}
            bar.set_postfix(**{k: f"{v:.2f}" for k, v in shown.items()}, acc=f"{acc:.2f}")
            if done:
                break
            if interrupt.requested:  # Ctrl-C: checkpoint the completed round, stop
                if not (cfg.checkpoint_every and counters["round"] % cfg.checkpoint_every == 0):
                    save()
                bar.close()
                if logger is not None:
                    logger.close()
                raise KeyboardInterrupt(f"interrupted after round {counters['round']}; "
                                        f"resume with: reval train --resume {run_dir}")
    bar.close()
    if logger is not None:
        logger.close()
    return {**last_eval, **counters}


class _DeferredInterrupt:
    """Turn the first Ctrl-C into a flag checked between rounds; a second one aborts at once.

    A checkpoint taken mid-round would pair a half-updated model with the counters of the
    last complete round, so the loop only stops at a round boundary.
    """

    def __enter__(self):
        self.requested = False
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this round, writing a checkpoint (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def _checkpoint(accelerator, policy, run_dir, cfg, model, tokenizer, reference, per_rank: dict, counters,
                extra: dict):
    """Write a checkpoint. With N processes, rank 0 writes the model and shared state and
    every rank adds its own shard (`per_rank`: buffer, reference cache, RNG, optimizer state)
    to the same staging dir."""
    shared = {"counters": dict(counters), "config": cfg.to_dict(), "world_size": accelerator.num_processes,
              **extra}
    if accelerator.num_processes == 1:
        clear_staging(run_dir, counters["round"])
        save_checkpoint(run_dir, counters["round"], model=model, tokenizer=tokenizer,
                        ref_model=reference if counters["ref_version"] else None,  # else: the starting model
                        state={**per_rank, **shared}, keep=cfg.keep_checkpoints)
        return
    from reval.checkpoint import save_state, staging_dir

    full_state = None
    if is_sharded(accelerator):  # FSDP / ZeRO-3: gather the full weights (a collective call)
        gathered = accelerator.get_state_dict(policy) or {}  # rank 0's; ZeRO-3 gives None elsewhere
        full_state = {k.removeprefix("lm."): v for k, v in gathered.items()}
        # a tied weight (embeddings = LM head) was gathered once per name: one tensor again, so
        # that save_pretrained stores it once, as it does for an unsharded model
        tied: dict[int, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in full_state:
                full_state[name] = tied.setdefault(id(p), full_state[name])
    if accelerator.is_main_process:
        clear_staging(run_dir, counters["round"])
    accelerator.wait_for_everyone()
    save_state(per_rank, staging_dir(run_dir, counters["round"]), f"rank-{accelerator.process_index}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(run_dir, counters["round"], model=model, tokenizer=tokenizer,
                        ref_model=reference if counters["ref_version"] else None, state=shared,
                        keep=cfg.keep_checkpoints, model_state_dict=full_state)
    accelerator.wait_for_everyone()


def _maybe_reset(reference, optimizer, cfg: TrainConfig, counters: dict, count: int) -> None:
    """Copy the policy into the reference when `count` (rounds or updates) is a multiple of
    `loss.ref_reset_every`. Replayed trajectories' reference log-probs are recomputed with
    the new reference at their next use."""
    every = cfg.loss.ref_reset_every
    if reference is not None and every and count % every == 0:
        reference.reset(optimizer)
        counters["ref_version"] += 1


def _choose_checkpoint(run_dir: Path, accelerator):
    """(checkpoint, this rank's state) to resume from: rank 0 verifies (hashes) and sets damaged
    ones aside, then tells the others which one, so every rank resumes the same round."""
    if accelerator.num_processes == 1:
        return find_resumable(run_dir, log=_say)
    from accelerate.utils import broadcast_object_list

    choice = [None]
    if accelerator.is_main_process:
        try:
            ckpt, state = find_resumable(run_dir, log=_say)
            choice = [ckpt.name if ckpt else ""]
        except CheckpointError as e:
            choice = [e]
    broadcast_object_list(choice, from_process=0)
    if isinstance(choice[0], Exception):
        raise choice[0]
    if accelerator.is_main_process:
        return ckpt, state
    if not choice[0]:
        return None, None
    ckpt = Path(run_dir) / "checkpoints" / choice[0]
    return ckpt, verify_checkpoint(ckpt, accelerator.process_index, hashes=False)  # rank 0 hashed it


def _inputs(problems, reward_funcs) -> dict:
    """What a run got from Python rather than its config (ReValTrainer, benchmarks): a
    fingerprint of the training problems and the reward functions' names, saved in checkpoints
    so a resume without them (or with others) is refused instead of training something else."""
    import hashlib

    record: dict = {}
    if problems is not None:
        h = hashlib.sha256()
        for p in problems:  # problems, or an offline algorithm's demonstrations / preference pairs
            text = f"{p.question}\x00{p.answer}" if hasattr(p, "answer") else "\x00".join(dataclasses.astuple(p))
            h.update(f"{text}\x01".encode("utf-8", "surrogatepass"))
        record["problems"] = f"{len(problems)} problems, sha256 {h.hexdigest()[:16]}"
    if reward_funcs:
        record["rewards"] = [reward_name(fn) for fn in reward_funcs]
    return record


def _inputs_message(saved: dict, now: dict) -> str:
    parts = [f"{k}: the run had {saved.get(k, 'none (the config)')}, now {now.get(k, 'none (the config)')}"
             for k in ("problems", "rewards") if saved.get(k) != now.get(k)]
    return ("cannot resume: this run was given its data or reward functions from Python (ReValTrainer), "
            "and they differ now (" + "; ".join(parts) + "). Resume it the same way, with the same "
            "train_dataset and reward_funcs: trainer.train(resume_from_checkpoint=True)")


NO_SIGNAL_ROUNDS = 3  # rounds in a row without a learning signal before the run says so


def _no_signal_message(cfg: TrainConfig, prompt: str, reward_names, rec: dict, rnd: int) -> str:
    """Why a run has learnt nothing for `NO_SIGNAL_ROUNDS` rounds: every group scored alike."""
    what = "every answer got reward 0" if rec["rollout/reward_mean"] == 0 else \
        "the answers to each prompt all got the same reward"
    return (f"\nWARNING: rounds {rnd + 2 - NO_SIGNAL_ROUNDS}-{rnd + 1}: {what}, so there is nothing to learn "
            f"(mean reward {rec['rollout/reward_mean']:.2f}, {100 * rec['rollout/truncated_frac']:.0f}% of answers "
            f"cut at max_new_tokens). Likely causes: the prompt (task.prompt = {prompt!r}) does not ask for "
            f"what the reward ({', '.join(reward_names)}) reads; the reward function or the answer column does not "
            f"match the data; or rollout.max_new_tokens = {cfg.max_new_tokens} cuts the answers short. Look at a "
            "few completions with `reval eval --out` and check them by hand.\n")


def _reward_columns(problems, G: int) -> dict[str, list]:
    """What reward functions get besides the completions: `answer`, `question` and every other
    column of the rows (None where a row lacks it), each repeated for the G answers."""
    columns = {"answer": [p.answer for p in problems for _ in range(G)],
               "question": [p.question for p in problems for _ in range(G)]}
    columns.update({k: [v for v in values for _ in range(G)] for k, values in extra_columns(problems).items()})
    return columns


def _report_reward_errors(errors: dict[str, str], seen: int, where: str, outcome: str) -> None:
    """Print the reward failures recorded after the first `seen` (each function's first one, once)."""
    for name, error in list(errors.items())[seen:]:
        _say(f"{where}: reward function {name} failed on an answer: {error}\n  (shown once; {outcome})")


def _unscored_message(cfg: TrainConfig, reward_names, columns: dict, rounds: int, rnd: int, failures: int,
                      answers: int) -> str:
    """Why a run stops after `rollout.max_unscored_rounds` rounds without a single reward."""
    return (f"no answer could be scored in {rounds} rounds in a row (round {rnd}: {failures} reward failures "
            f"among {answers} answers); stopping. Likely causes: the reward function "
            f"({', '.join(reward_names)}) raises or returns non-numbers; rollout.reward_timeout = "
            f"{cfg.rollout.reward_timeout:g}s is too short; or the data lacks a column it needs (it gets "
            f"{', '.join(columns)}). Try it on a few answers; rollout.max_unscored_rounds sets how many "
            "such rounds stop the run.")


def _round_record(counters: dict, fresh, upd_metrics: list[dict], t_gen: float, t_upd: float, samples=None,
                  rewards=None, reward_failures: int = 0, buffer_size: int = 0, sampler_lag: int = 0) -> dict:
    """A round's metrics line: counters, the data (sampled answers, or with `samples` None the
    offline examples), and the mean over its K updates. `sampler_lag`: how many updates the
    sampler's weights were behind the policy's when it generated the round's answers."""
    rec = {"round": counters["round"], "samples": counters["samples"], "seconds": counters["seconds"],
           "updates": counters["updates"], "perf/generate_seconds": t_gen, "perf/update_seconds": t_upd}
    if samples is None:
        rec["data/response_len"] = sum(len(e.response_ids) for e in fresh) / len(fresh)
    else:
        r = torch.tensor([x for x in rewards if x is not None] or [0.0])
        rec.update({"rollout/reward_mean": r.mean().item(),
                    "rollout/response_len": sum(map(len, samples.response_ids)) / len(samples.response_ids),
                    "rollout/truncated_frac": sum(samples.truncated) / len(samples.truncated),
                    "rollout/reward_failures": reward_failures,
                    "rollout/groups_all_same": _groups_all_same(fresh),
                    "rollout/sampler_lag": sampler_lag,
                    "buffer/size": buffer_size, "q/ref_version": counters["ref_version"]})
    for key in (upd_metrics[0] if upd_metrics else {}):  # mean over the K updates
        rec[key] = sum(m[key] for m in upd_metrics) / len(upd_metrics)
    if upd_metrics and samples is not None:
        rec["buffer/staleness_max"] = max(m["buffer/staleness_max"] for m in upd_metrics)
    return rec


def _groups_all_same(experiences) -> float:
    """Fraction of groups whose answers all got the same reward (no learning signal for GRPO)."""
    groups: dict[int, set] = {}
    for e in experiences:
        groups.setdefault(e.group_id, set()).add(e.reward)
    return sum(len(v) == 1 for v in groups.values()) / max(len(groups), 1)


def _truncate_metrics(path: Path, last_round: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be redone),
    and lines that are not records (a line torn by a crash mid-write, garbage), with a note."""
    if path.exists():
        bad: list[int] = []
        keep = [r for r in read_metrics(path, bad_lines=bad) if r["round"] <= last_round]
        if bad:
            _say(f"{path}: dropped {len(bad)} line(s) that are not metric records (line "
                 f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)

