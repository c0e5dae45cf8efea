"""vLLM server rollout backend: the sampler is a `vllm serve` process, here or on another
machine, driven only through vLLM's own HTTP server (as TRL's server mode drives its own).

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL_DIR --host 0.0.0.0 --port 8000 --dtype float32
    reval train --rollout.backend vllm-server --rollout.vllm-server http://HOST:8000 \\
        --rollout.vllm-weights-dir /shared/reval-weights

Sampling: one OpenAI-style `/v1/completions` request per prompt, prompt as token ids (our
tokenizer, as in `reval.rollout_vllm`), `n` answers, vLLM's extra sampling fields
(`top_k`, `seed`, `stop_token_ids`, `return_token_ids`) and `logprobs: 0` when GRPO's
sampler correction needs the sampled tokens' log-probs. Requests go out together (vLLM
batches them); prompt i draws from a seed derived from (seed, i), so a call is reproducible.

Weight update: vLLM's in-place reload. `sync_weights(model)` writes the policy's weights
(a LoRA adapter merged, Hugging Face names) as one safetensors file to `weights_dir`, then
calls the server's `/collective_rpc` with its workers' `reload_weights(weights_path=...)`,
which loads them through the model's own `load_weights` (in place: CUDA graphs stay valid),
and `/reset_prefix_cache`. Both endpoints are vLLM's development endpoints, served only with
`VLLM_SERVER_DEV_MODE=1`. `weights_dir` must be readable by the server under the same path:
the same machine, or a shared filesystem. vLLM's `/update_weights` endpoint with its NCCL
weight-transfer engine is the GPU-to-GPU alternative; it needs GPUs on both sides and is not
used here (docs/async.md).

Nothing here imports vllm: the client needs only the standard library.
"""

from __future__ import annotations

import json
import random
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

from reval.rollout import Samples
from reval.rollout_vllm import _hf_weight_names, _to_samples

DEV_MODE_HINT = "start the server with VLLM_SERVER_DEV_MODE=1 (its weight-reload endpoints are development endpoints)"


class ServerError(ConnectionError):
    """The vLLM server could not be reached or refused a request; the message says which and why."""


class VLLMServerGenerator:
    """A `vllm serve` process behind the rollout-backend interface (`generate`, `sync_weights`)."""

    def __init__(self, url: str, tokenizer, eos_token_ids: list[int], weights_dir: str | Path,
                 timeout: float = 600.0):
        self.url, self.tokenizer, self.eos_token_ids = url.rstrip("/"), tokenizer, list(eos_token_ids)
        self.weights_dir, self.timeout = Path(weights_dir).resolve(), timeout
        models = self._call("GET", "/v1/models", timeout=30)
        self.model_name = models["data"][0]["id"]
        try:
            self._call("GET", "/is_paused", timeout=30)
        except ServerError as e:
            raise ServerError(f"the vLLM server at {self.url} has no weight-update endpoints: {DEV_MODE_HINT}"
                              f" ({e})") from None

    # ------------------------------------------------------------------ HTTP
    def _call(self, method: str, path: str, body: dict | None = None, timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise ServerError(f"the vLLM server at {self.url} answered {method} {path} with HTTP {e.code}: "
                              f"{detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise ServerError(f"cannot reach the vLLM server at {self.url} ({method} {path}: {e}); is "
                              "`vllm serve` running there, and is rollout.vllm_server its address?") from None
        return json.loads(text) if text else None

    # ------------------------------------------------------------------ interface
    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Write `model`'s full weights (LoRA merged) to `weights_dir` and have the server reload them."""
        from safetensors.torch import save_file

        self.weights_dir.mkdir(parents=True, exist_ok=True)
        state = {name: t.detach().to("cpu").contiguous().clone() for name, t in _hf_weight_names(model)}
        tmp = self.weights_dir / "model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(self.weights_dir / "model.safetensors")  # the server never reads a half-written file
        self._call("POST", "/collective_rpc", {"method": "reload_weights",
                                               "kwargs": {"weights_path": str(self.weights_dir)}})
        self._call("POST", "/reset_prefix_cache")  # cached KV was computed with the old weights

    def generate(self, prompts: list[str], *, samples_per_prompt: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 64, greedy: bool = False,
                 seed: int | None = None, return_logprobs: bool = False) -> Samples:
        """As `reval.rollout_vllm.VLLMGenerator.generate`, through the server."""
        if not prompts:
            return Samples([], [], [])
        prompt_ids = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        rng = random.Random(seed)
        seeds = [None if greedy or seed is None else rng.getrandbits(31) for _ in prompts]

        def one(ids, s):
            body = {"model": self.model_name, "prompt": list(ids), "n": 1 if greedy else samples_per_prompt,
                    "temperature": 0.0 if greedy else temperature, "top_p": 1.0 if greedy else top_p,
                    "top_k": -1, "max_tokens": max_new_tokens, "stop_token_ids": self.eos_token_ids,
                    "return_token_ids": True, "skip_special_tokens": False}
            if s is not None:
                body["seed"] = s
            if return_logprobs:
                body["logprobs"] = 0
            return self._call("POST", "/v1/completions", body)

        with ThreadPoolExecutor(max_workers=min(32, len(prompts))) as pool:
            responses = list(pool.map(one, prompt_ids, seeds))
        outputs = [SimpleNamespace(outputs=[_completion(c, return_logprobs) for c in r["choices"]]
                                   * (samples_per_prompt if greedy else 1)) for r in responses]
        return _to_samples(outputs, prompt_ids, self.eos_token_ids, max_new_tokens, with_logprobs=return_logprobs)


def _completion(choice: dict, with_logprobs: bool) -> SimpleNamespace:
    """An OpenAI completion choice as the `CompletionOutput` fields `_to_samples` reads."""
    ids = list(choice["token_ids"])
    logprobs = None
    if with_logprobs:  # the sampled token's log-prob per step, keyed by its id as vLLM's own outputs are
        values = choice["logprobs"]["token_logprobs"]
        logprobs = [{t: SimpleNamespace(logprob=v)} for t, v in zip(ids, values)]
    return SimpleNamespace(index=choice.get("index", 0), token_ids=ids, logprobs=logprobs)
