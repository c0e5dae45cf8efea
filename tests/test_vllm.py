"""The vLLM rollout backend: pure helpers on CPU, the plumbing against a fake `vllm`, and
the real engine on a GPU (skipped without CUDA and vllm)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from reval.model import build_char_tokenizer, build_tiny_model
from reval.rollout import Samples
from reval.rollout import generate as hf_generate
from reval.rollout_vllm import VLLMGenerator, _hf_weight_names, _to_samples

EOS = 1


def _request(*completions):
    """A RequestOutput-like object: completions are (token_ids, finish_reason[, index])."""
    outs = [SimpleNamespace(token_ids=list(c[0]), finish_reason=c[1],
                            index=c[2] if len(c) > 2 else j) for j, c in enumerate(completions)]
    return SimpleNamespace(outputs=outs)


# --------------------------------------------------------------------------- _to_samples


def test_to_samples_prompt_major_eos_cut_and_truncation():
    outputs = [
        _request(([5, 6, EOS], "stop"), ([7, 8, 9, 10], "length")),
        _request(([EOS], "stop"), ([11, 12, 13, 14], "length")),
    ]
    s = _to_samples(outputs, [[3, 4], [2]], eos_ids=[EOS], max_new_tokens=4)
    assert isinstance(s, Samples) and s.logprobs is None
    assert s.prompt_ids == [[3, 4], [3, 4], [2], [2]]
    assert s.response_ids == [[5, 6, EOS], [7, 8, 9, 10], [EOS], [11, 12, 13, 14]]
    assert s.truncated == [False, True, False, True]


def test_to_samples_with_sampler_logprobs_cut_like_the_answer():
    steps = [{t: SimpleNamespace(logprob=-0.1 * t)} for t in (5, EOS, 6)]
    outputs = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[5, EOS, 6], finish_reason="stop", index=0,
                                                        logprobs=steps)])]
    s = _to_samples(outputs, [[3]], eos_ids=[EOS], max_new_tokens=4, with_logprobs=True)
    assert s.response_ids == [[5, EOS]] and s.logprobs == [[-0.5, -0.1 * EOS]]


def test_to_samples_orders_by_index_and_uses_every_eos_id():
    # completions arrive out of order; 50 is a generation-config EOS besides the tokenizer's
    outputs = [_request(([20, 50, 21], "stop", 1), ([30, 31], "length", 0))]
    s = _to_samples(outputs, [[9]], eos_ids=[EOS, 50], max_new_tokens=2)
    assert s.response_ids == [[30, 31], [20, 50]]
    assert s.truncated == [True, False]


def test_to_samples_cuts_at_first_eos_and_at_max_new_tokens():
    outputs = [_request(([4, EOS, 5, EOS], "stop"), ([6, 7, 8, 9, 10], "length"))]
    s = _to_samples(outputs, [[9]], eos_ids=[EOS], max_new_tokens=3)
    assert s.response_ids == [[4, EOS], [6, 7, 8]]
    assert s.truncated == [False, True]
    with pytest.raises(ValueError, match="2 vLLM outputs for 1 prompts"):
        _to_samples(outputs * 2, [[9]], eos_ids=[EOS], max_new_tokens=3)


# --------------------------------------------------------------------------- _hf_weight_names


@pytest.fixture()
def tiny_model():
    tok = build_char_tokenizer()
    return build_tiny_model(len(tok), hidden=32, layers=2, heads=2, seed=0), tok


def test_weight_names_plain_model_is_its_state_dict(tiny_model):
    model, _ = tiny_model
    sd = model.state_dict()
    pairs = list(_hf_weight_names(model))
    assert [n for n, _ in pairs] == list(sd)
    for name, t in pairs:
        assert t.data_ptr() == sd[name].data_ptr()  # aliases, not copies


def test_weight_names_lora_are_base_names_with_merged_values(tiny_model):
    peft = pytest.importorskip("peft")
    model, tok = tiny_model
    base = {n: t.clone() for n, t in model.state_dict().items()}
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B = 0 at init would make the merge invisible
    x = torch.tensor([tok("Q: 1+2\nA: ", add_special_tokens=False)["input_ids"]])
    lora.eval()
    with torch.no_grad():
        before = lora(x).logits

    sent = {n: t.clone() for n, t in _hf_weight_names(lora)}  # clone while the tensor is live

    assert list(sent) == list(base)
    n_merged = 0
    for module_name, module in lora.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        name = module_name.removeprefix("base_model.model.") + ".weight"
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        expected = base[name] + (b @ a) * module.scaling["default"]
        torch.testing.assert_close(sent[name], expected)
        assert not torch.allclose(sent[name], base[name])
        n_merged += 1
    assert n_merged == 2 * 2  # q_proj and v_proj in 2 layers
    for name, t in base.items():
        if not name.endswith(("q_proj.weight", "v_proj.weight")):
            torch.testing.assert_close(sent[name], t)
    # unmerged again: same forward as before, no layer left merged
    assert not any(getattr(m, "merged", False) for m in lora.modules() if hasattr(m, "merged_adapters"))
    with torch.no_grad():
        torch.testing.assert_close(lora(x).logits, before)


def test_weight_names_lora_already_merged_is_left_merged(tiny_model):
    peft = pytest.importorskip("peft")
    model, _ = tiny_model
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    lora.merge_adapter()
    list(_hf_weight_names(lora))
    assert all(m.merged for m in lora.modules() if hasattr(m, "merged_adapters"))


def test_weight_names_rejects_adapter_weights_outside_peft(tiny_model):
    model, _ = tiny_model
    model.register_buffer("lora_A_stray", torch.zeros(1))
    with pytest.raises(ValueError, match="not a peft"):
        list(_hf_weight_names(model))


# --------------------------------------------------------------------------- plumbing, fake vllm


class _FakeOldLLM:
    """Records what VLLMGenerator asks of vllm.LLM; echoes each prompt's last token.

    Like engines without `LLM.apply_model`: the model is reached by attribute path.
    """

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.loaded: list[str] = []
        self.resets = 0
        self.calls: list = []
        model = SimpleNamespace(load_weights=lambda ws: self.loaded.extend(n for n, _ in ws))
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model))))
        self._model = model

    def reset_prefix_cache(self):
        self.resets += 1

    def generate(self, requests, sampling_params, use_tqdm):
        self.calls.append((requests, sampling_params))
        outs = []
        for req, sp in zip(requests, sampling_params):
            last = req["prompt_token_ids"][-1]
            outs.append(SimpleNamespace(outputs=[
                SimpleNamespace(index=j, token_ids=[last, 40 + j, EOS], finish_reason="stop")
                for j in reversed(range(sp.n))]))  # out of order on purpose
        return outs


class _FakeLLM(_FakeOldLLM):
    def apply_model(self, fn):
        self.applied = True
        return [fn(self._model)]


@pytest.fixture()
def fake_vllm(monkeypatch):
    mod = ModuleType("vllm")
    mod.__version__ = "0.0-fake"
    mod.LLM = _FakeLLM
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored (unset) after the test
    return mod


def test_generator_plumbing_with_fake_vllm(fake_vllm, tiny_dir):
    tok = build_char_tokenizer()
    gen = VLLMGenerator(str(tiny_dir), tok, gpu_memory_utilization=0.3, max_model_len=128,
                        enforce_eager=True)
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    kw = gen.llm.kwargs
    assert kw["model"] == str(tiny_dir) and kw["dtype"] == "bfloat16" and kw["seed"] == 0
    assert kw["gpu_memory_utilization"] == 0.3 and kw["max_model_len"] == 128
    assert kw["skip_tokenizer_init"] and kw["enforce_eager"] and "enable_sleep_mode" not in kw
    assert gen.eos_token_ids == [tok.eos_token_id]

    prompts = ["Q: 1+1\nA: ", "Q: 22+3\nA: "]
    s = gen.generate(prompts, samples_per_prompt=3, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=11)
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    requests, params = gen.llm.calls[-1]
    assert requests == [{"prompt_token_ids": i} for i in ids]
    assert [p.n for p in params] == [3, 3]
    assert all(p.temperature == 0.7 and p.top_p == 0.9 and p.top_k == -1 and p.max_tokens == 5
               and p.stop_token_ids == [tok.eos_token_id] for p in params)
    assert len({p.seed for p in params}) == 2  # one seed base per prompt
    assert s.prompt_ids == [ids[0]] * 3 + [ids[1]] * 3
    assert s.response_ids == [[ids[i][-1], 40 + j, EOS] for i in range(2) for j in range(3)]
    assert s.truncated == [False] * 6
    # same seed -> same per-prompt seeds
    gen.generate(prompts, samples_per_prompt=3, seed=11)
    assert [p.seed for p in gen.llm.calls[-1][1]] == [p.seed for p in params]

    g = gen.generate(prompts, samples_per_prompt=2, greedy=True, seed=11)
    _, gparams = gen.llm.calls[-1]
    assert all(p.n == 1 and p.temperature == 0.0 and p.seed is None for p in gparams)
    assert len(g.response_ids) == 4 and g.response_ids[0] == g.response_ids[1]
    assert gen.generate([]).response_ids == []

    model = build_tiny_model(len(tok), hidden=32, layers=2, heads=2)
    gen.sync_weights(model)
    assert gen.llm.loaded == list(model.state_dict()) and gen.llm.resets == 1 and gen.llm.applied


def test_generator_old_engine_fallback_and_sleep(fake_vllm, tiny_dir):
    class OldLLM(_FakeOldLLM):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.sleeps: list = []

        def sleep(self, level):
            self.sleeps.append(level)

        def wake_up(self):
            self.sleeps.append("wake")

    fake_vllm.LLM = OldLLM
    tok = build_char_tokenizer()
    gen = VLLMGenerator(str(tiny_dir), tok, enable_sleep_mode=True)
    assert gen.llm.kwargs["enable_sleep_mode"] is True
    gen.generate(["Q: 1+1\nA: "])
    gen.sync_weights(build_tiny_model(len(tok), hidden=32, layers=2, heads=2))
    gen.generate(["Q: 1+1\nA: "])
    assert gen.llm.sleeps == [1, "wake", 1] and gen.llm.resets == 1
    assert not hasattr(gen.llm, "apply_model")
    assert len(gen.llm.loaded) == len(build_tiny_model(len(tok), hidden=32, layers=2, heads=2).state_dict())


def test_generator_refuses_an_out_of_process_engine(fake_vllm, tiny_dir):
    class MPLLM(_FakeLLM):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.llm_engine = SimpleNamespace()  # no model_executor: engine core elsewhere

    fake_vllm.LLM = MPLLM
    tok = build_char_tokenizer()
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        VLLMGenerator(str(tiny_dir), tok)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_missing_vllm_says_how_to_install(tiny_dir, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored (unset) after the test
    with pytest.raises(ImportError) as e:
        VLLMGenerator(str(tiny_dir), build_char_tokenizer())
    assert 'pip install "reval[vllm]"' in str(e.value) and "CUDA GPU" in str(e.value)


# --------------------------------------------------------------------------- the real engine


def _vllm_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def _near_greedy(model, prompt_ids, response, k, rel_tol=0.03) -> bool:
    """Each of the first k tokens is (within rel_tol of the logit range of) the HF argmax."""
    seq = torch.tensor([list(prompt_ids) + list(response)], device=model.device)
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt_ids) - 1:-1].float()
    for t, row in zip(response[:k], logits[:k]):
        if row.max() - row[t] > rel_tol * (row.max() - row.min()):
            return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _vllm_usable(), reason="needs a CUDA GPU and vllm")
def test_vllm_generate_and_sync_match_hf(tmp_path):
    tok = build_char_tokenizer()
    # head_dim 64: every attention backend supports it
    model = build_tiny_model(len(tok), hidden=128, layers=2, heads=2, seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = model.cuda().eval()
    gen = VLLMGenerator(str(tmp_path), tok, gpu_memory_utilization=0.3, max_model_len=256,
                        enforce_eager=True)

    prompts = [f"Q: {a}+{b}\nA: " for a, b in [(1, 2), (13, 4), (7, 70), (5, 5), (31, 8), (2, 99)]]
    s = gen.generate(prompts, samples_per_prompt=3, max_new_tokens=12, seed=0)
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    assert len(s.response_ids) == len(s.prompt_ids) == len(s.truncated) == 18
    assert s.prompt_ids == [i for i in ids for _ in range(3)]
    for r, t in zip(s.response_ids, s.truncated):
        assert 1 <= len(r) <= 12
        assert t == (EOS not in r) and (t or r[-1] == EOS and r.count(EOS) == 1)

    # change the training weights (a differently initialised model), push, compare greedy
    new = build_tiny_model(len(tok), hidden=128, layers=2, heads=2, seed=1)
    model.load_state_dict(new.state_dict())
    k = 4
    stale = gen.generate(prompts, greedy=True, max_new_tokens=k)
    gen.sync_weights(model)
    fresh = gen.generate(prompts, greedy=True, max_new_tokens=k)
    hf = hf_generate(model, tok, prompts, greedy=True, max_new_tokens=k)
    assert fresh.prompt_ids == hf.prompt_ids
    assert all(_near_greedy(model, p, r, k) for p, r in zip(fresh.prompt_ids, fresh.response_ids))
    same = sum(a[:k] == b[:k] for a, b in zip(fresh.response_ids, hf.response_ids))
    assert same >= len(prompts) - 1, (fresh.response_ids, hf.response_ids)  # bf16 vs fp32 near-ties
    assert fresh.response_ids != stale.response_ids

    # a LoRA policy: the merged weights are what vLLM samples from
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    lora.eval()
    gen.sync_weights(lora)
    assert not any(getattr(m, "merged", False) for m in lora.modules() if hasattr(m, "merged_adapters"))
    merged = copy.deepcopy(lora).merge_and_unload()
    lora_out = gen.generate(prompts, greedy=True, max_new_tokens=k)
    assert all(_near_greedy(merged, p, r, k) for p, r in zip(lora_out.prompt_ids, lora_out.response_ids))


# --------------------------------------------------------------------------- the vLLM server client's errors
# (the client against a real `vllm serve`: tests/test_vllm_engine.py, in the vLLM environment)

def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_no_vllm_server_is_one_clear_line_from_reval_train(tmp_path, tiny_dir):
    import subprocess

    url = f"http://127.0.0.1:{_closed_port()}"
    proc = subprocess.run([sys.executable, "-m", "reval.cli", "train", "--model.path", str(tiny_dir), "--rounds", "1",
                           "--rollout.backend", "vllm-server", "--rollout.vllm-server", url, "--out",
                           str(tmp_path / "run"), "--no-progress", "--report-to", "none"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot reach the vLLM server at {url}" in proc.stderr and "vllm serve" in proc.stderr


def test_a_server_without_dev_mode_is_told_how_to_start_it(tiny_model):
    """A server that answers /v1/models but not the weight-reload endpoints (no VLLM_SERVER_DEV_MODE)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from reval.rollout_vllm_server import ServerError, VLLMServerGenerator

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/v1/models":
                body = json.dumps({"data": [{"id": "m"}]}).encode()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ServerError, match="VLLM_SERVER_DEV_MODE=1.*HTTP 404"):
            VLLMServerGenerator(f"http://127.0.0.1:{httpd.server_address[1]}", tiny_model[1], [0], "/tmp/unused")
    finally:
        httpd.shutdown()
