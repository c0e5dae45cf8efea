"""What a newcomer points `reval eval` / `load_model` at after training: a LoRA run's
checkpoint (the adapter is merged into the base it names, or into the checkpoint's reference
after a reset) and a whole run directory (its newest checkpoint); and a LoRA run that prints
no deprecation warnings (issue 25, items 6, 7 and 15)."""

import json
import shutil
import warnings

import pytest
import torch

import reval.loop.state as loop_state
from reval.config import TrainConfig
from reval.model import default_model_path, load_model
from reval.train import train

TEXT = "Q: What is 12+34?\nA: 12+34=46. \\boxed{46}"


def _logp(model, tokenizer) -> torch.Tensor:
    """(T-1,) log-probs of TEXT's tokens, each given the ones before it."""
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]


def _lora_config(base, out, rounds: int) -> TrainConfig:
    cfg = TrainConfig(rounds=rounds, out=out, progress=False, checkpoint_every=1, keep_checkpoints=rounds)
    cfg.model.path, cfg.model.lora_rank, cfg.model.lora_alpha = str(base), 4, 8
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 4, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test, cfg.eval.samples = 32, 8, 8, 0
    cfg.optim.lr = 3e-2  # an adapter that visibly moves the policy in a few updates
    return cfg


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """3 LoRA rounds from the shipped `add` warm start (right answers, so something to learn), a
    reference reset after round 2 (the adapter merged into the base), a checkpoint every round;
    with the in-memory policy's log-probs of TEXT at each save."""
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = _lora_config(default_model_path("add"), out, rounds=3)
    cfg.loss.ref_reset_every = 2
    policy_logp = {}
    save = loop_state.save_checkpoint

    def capture(run_dir, round_, *, model, tokenizer, **kwargs):
        policy_logp[round_] = _logp(model, tokenizer)  # the trained policy, adapter on
        return save(run_dir, round_, model=model, tokenizer=tokenizer, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(loop_state, "save_checkpoint", capture)
    try:
        train(cfg)
    finally:
        mp.undo()
    return out, policy_logp


def _ckpt(run, round_):
    return run / "checkpoints" / f"round-{round_:06d}" / "model"


# -- item 6: a LoRA checkpoint evaluates as the trained policy ----------------------------------

@pytest.mark.parametrize("round_", [1, 3])
def test_a_lora_checkpoint_loads_as_the_trained_policy(lora_run, round_):
    """Round 1: the adapter on the base model its adapter_config.json names. Round 3: after a
    reference reset merged the adapter into the base, the base is the checkpoint's reference/."""
    run, policy_logp = lora_run
    model_dir = _ckpt(run, round_)
    assert (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").exists()
    assert (model_dir.parent / "reference").is_dir() == (round_ == 3)
    model, tok = load_model(model_dir)
    assert not hasattr(model, "peft_config")  # merged into a plain HF model: generation at full speed
    assert not any("lora_" in name for name in model.state_dict())
    base, base_tok = load_model(default_model_path("add"))
    assert (_logp(base, base_tok) - policy_logp[round_]).abs().max() > 1e-2  # training moved the policy
    # equal up to the rounding of W + B @ A (the merge), 100x below the training's move
    torch.testing.assert_close(_logp(model, tok), policy_logp[round_], atol=1e-4, rtol=0)


def test_a_lora_checkpoint_without_its_base_model_says_where_it_looked(lora_run, tmp_path):
    run, _ = lora_run
    adapter = tmp_path / "adapter"
    shutil.copytree(_ckpt(run, 1), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(OSError) as e:
        load_model(adapter)
    message = str(e.value)
    assert str(tmp_path / "moved-away") in message and "base_model_name_or_path" in message
    assert str(adapter / "adapter_config.json") in message and "README" not in message


def test_reval_eval_scores_a_lora_checkpoint(lora_run, tmp_path, capsys):
    from reval.cli import main

    run, _ = lora_run
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "What is 2+2?", "answer": "4"}\n{"question": "1+1?", "answer": 2}\n')
    out = tmp_path / "res.json"
    main(["eval", "--model", str(_ckpt(run, 3)), "--data", str(data), "--out", str(out),
          "--max-new-tokens", "8"])
    assert len(json.loads(out.read_text())["data"]["items"]) == 2


def test_reval_eval_on_vllm_starts_from_the_base_and_takes_the_merged_weights(lora_run, tmp_path, monkeypatch):
    """vLLM cannot read an adapter directory: the engine starts from the base load_model read
    (here the checkpoint's reference/) and gets the merged policy's weights pushed."""
    import sys
    from types import ModuleType, SimpleNamespace

    from reval.cli import main

    engines = []

    class FakeLLM:  # records what it was given; every answer ends at once
        def __init__(self, **kwargs):
            self.kwargs, self.loaded = kwargs, {}
            model = SimpleNamespace(load_weights=lambda ws: self.loaded.update((n, t.clone()) for n, t in ws))
            self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
                driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model))))
            engines.append(self)

        def reset_prefix_cache(self):
            pass

        def generate(self, requests, sampling_params, use_tqdm):
            return [SimpleNamespace(outputs=[SimpleNamespace(index=j, token_ids=[1], finish_reason="stop")
                                             for j in range(sp.n)]) for sp in sampling_params]

    vllm = ModuleType("vllm")
    vllm.__version__, vllm.LLM, vllm.SamplingParams = "0.0-fake", FakeLLM, lambda **kw: SimpleNamespace(**kw)
    platforms = ModuleType("vllm.platforms")
    platforms.current_platform = SimpleNamespace(is_cpu=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # restored after the test
    run, _ = lora_run
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "What is 2+2?", "answer": "4"}\n')
    main(["eval", "--model", str(run), "--backend", "vllm", "--data", str(data), "--max-new-tokens", "8"])
    (engine,) = engines
    assert engine.kwargs["model"] == str(run / "checkpoints" / "round-000003" / "reference")
    merged, _ = load_model(_ckpt(run, 3))
    assert engine.loaded.keys() == merged.state_dict().keys()
    assert all(torch.equal(engine.loaded[k], v) for k, v in merged.state_dict().items())


# -- item 7: a run directory evaluates its newest checkpoint -----------------------------------

def test_a_run_directory_loads_its_newest_checkpoint(lora_run, capsys):
    run, policy_logp = lora_run
    model, tok = load_model(run)
    said = [line for line in capsys.readouterr().err.splitlines() if "checkpoint" in line]
    assert len(said) == 1 and str(_ckpt(run, 3)) in said[0]  # one line says which
    torch.testing.assert_close(_logp(model, tok), policy_logp[3], atol=1e-4, rtol=0)


def test_reval_eval_of_a_run_directory_names_the_checkpoint(lora_run, tmp_path, capsys):
    from reval.cli import main

    run, _ = lora_run
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "What is 2+2?", "answer": "4"}\n')
    main(["eval", "--model", str(run), "--data", str(data), "--max-new-tokens", "8"])
    assert str(_ckpt(run, 3)) in capsys.readouterr().err


def test_a_run_directory_without_a_checkpoint_says_so(lora_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(lora_run[0] / "config.json", run / "config.json")
    with pytest.raises(OSError, match=r"run directory.*no checkpoint"):
        load_model(run)
    (run / "checkpoints").mkdir()
    with pytest.raises(OSError, match=r"run directory.*no checkpoint"):
        load_model(run)


# -- item 15: LoRA without transformers' FutureWarning ------------------------------------------

def test_a_lora_run_its_resume_and_its_checkpoint_raise_no_future_warning(tiny_dir, tmp_path):
    """peft asks the model for `is_gradient_checkpointing`, which transformers 5 deprecates:
    when the adapter is added, loaded on resume, and loaded for evaluation."""
    cfg = _lora_config(tiny_dir, tmp_path / "run", rounds=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        train(cfg)
        cfg.rounds = 2
        train(cfg, resume=True)
        load_model(_ckpt(tmp_path / "run", 2))
