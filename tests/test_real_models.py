"""The real-model path on tiny stand-ins built locally: a Qwen2 chat model and a Llama base model.

Loading, chat templates and the paper's prompt, left padding, several EOS tokens, chunked
log-probs on a large vocabulary, the LoRA reference, and a few training rounds with LoRA,
math data and a stale sampler. Nothing is downloaded.
"""

import copy
import json

import pytest
import torch

from reval.buffer import collate
from reval.config import TrainConfig
from reval.logprobs import sequence_logprobs
from reval.model import (PROMPTS, add_lora, eos_token_ids, format_prompt, load_model, resolve_template,
                         use_chat_template)
from reval.reference import Reference
from reval.rollout import generate, to_experiences
from reval.train import train

from conftest import build_real_style


def test_chat_template_paper_prompt_and_eos(qwen_dir):
    model, tok = load_model(qwen_dir)
    assert use_chat_template(tok, "auto") and not use_chat_template(tok, "off")
    assert eos_token_ids(model, tok) == [2, 0]  # <|im_end|> and the generation config's <|endoftext|>
    text = format_prompt(tok, "What is 2+3?", resolve_template("paper"), chat=True)
    assert text == ("<|im_start|>user\nWhat is 2+3? Let's think step by step and output the final answer "
                    "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # special tokens stay single tokens


def test_plain_prompt_keeps_llama_bos_once(llama_dir):
    model, tok = load_model(llama_dir)
    assert tok.pad_token == tok.eos_token == "</s>"  # no pad token: EOS pads
    assert not use_chat_template(tok, "auto")
    with pytest.raises(ValueError, match="no chat template"):
        use_chat_template(tok, "on")
    ids = tok(format_prompt(tok, "2+3?", resolve_template("question")), add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_bad_prompt_template():
    with pytest.raises(ValueError, match="neither a preset"):
        resolve_template("Answer: {answer}")
    assert resolve_template("plain") == PROMPTS["plain"]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_left_padding_does_not_change_greedy_answers(arch, qwen_dir, llama_dir):
    model, tok = load_model(qwen_dir if arch == "qwen2" else llama_dir)
    eos = eos_token_ids(model, tok)
    prompts = [format_prompt(tok, q, resolve_template("question"), chat=arch == "qwen2")
               for q in ("A long question with many words in it?", "Hi?")]
    batched = generate(model, tok, prompts, greedy=True, max_new_tokens=10, eos_token_ids=eos)
    for i, p in enumerate(prompts):
        alone = generate(model, tok, [p], greedy=True, max_new_tokens=10, eos_token_ids=eos)
        assert alone.response_ids[0] == batched.response_ids[i]
        assert alone.prompt_ids[0] == batched.prompt_ids[i]  # padding stripped from stored prompts


def test_generation_stops_at_every_eos_token(qwen_dir):
    model, tok = load_model(qwen_dir)
    with torch.no_grad():  # hidden states 0 -> all logits 0 -> greedy picks id 0, <|endoftext|>
        model.model.norm.weight.zero_()
    out = generate(model, tok, ["<|im_start|>user\nx<|im_end|>\n"], greedy=True, max_new_tokens=5,
                   eos_token_ids=eos_token_ids(model, tok))
    # <|endoftext|> is an EOS only through the generation config, and it ends the answer
    assert out.response_ids[0] == [0] and out.truncated == [False]


def _batch(model, tok, n=3, new=24):
    torch.manual_seed(0)
    s = generate(model, tok, ["2+3?", "A longer question here?"], samples_per_prompt=n, max_new_tokens=new,
                 eos_token_ids=eos_token_ids(model, tok))
    return collate(to_experiences(s, [1.0, 0.0] * n, samples_per_prompt=n, version=0, round=0), tok.pad_token_id)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_chunked_logprobs_equal_unchunked_on_a_large_vocabulary(arch, tmp_path):
    model, tok = load_model(build_real_style(tmp_path, arch, vocab_size=20_000))
    batch = _batch(model, tok)
    results = []
    for chunk in (None, 5):
        model.zero_grad()
        logp, v = sequence_logprobs(model, batch, chunk)
        (logp.sum(1) * 0.3 + v).pow(2).mean().backward()
        results.append((logp.detach(), v.detach(), model.get_input_embeddings().weight.grad.clone()))
    for a, b in zip(*results):  # equal up to float summation order
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_lora_reference_is_the_base_model(qwen_dir):
    base, tok = load_model(qwen_dir)
    frozen = copy.deepcopy(base)
    policy = add_lora(base, rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    batch = _batch(policy, tok)
    ref = Reference(policy)
    ref_logp, ref_v = ref.logprobs(batch)
    want_logp, want_v = sequence_logprobs(frozen, batch)
    torch.testing.assert_close(ref_logp, want_logp)
    torch.testing.assert_close(ref_v, want_v)
    pol_logp, _ = sequence_logprobs(policy, batch)
    assert (pol_logp - ref_logp).abs().max() > 1e-3  # the adapter is live outside the context
    n_params = sum(p.numel() for p in policy.parameters())
    assert n_params < 1.2 * sum(p.numel() for p in frozen.parameters())  # no second copy of the weights

    # reference reset: merge the adapter into the base, restart it at B = 0
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
    ref.reset(opt)
    with torch.no_grad():
        after_logp, _ = sequence_logprobs(policy, batch)
    torch.testing.assert_close(after_logp, pol_logp, rtol=1e-4, atol=1e-4)  # the policy did not move
    torch.testing.assert_close(ref.logprobs(batch)[0], after_logp, rtol=1e-4, atol=1e-4)  # pi_ref = pi_theta


def test_full_finetuning_reference_reset_copies_in_place(tiny):
    model, _ = tiny
    ref = Reference(model, copy.deepcopy(model))
    ptrs = [p.data_ptr() for p in ref.copy.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ref.reset()
    assert [p.data_ptr() for p in ref.copy.parameters()] == ptrs
    for a, b in zip(ref.copy.parameters(), model.parameters()):
        assert torch.equal(a, b)


def _math_jsonl(path, n=40):
    """Addition problems in DeepScaleR's schema, which the shipped model answers in \\boxed{}."""
    from reval.tasks.arithmetic import split

    rows = [{"problem": p.question, "answer": int(p.answer)} for p in split("train", n, 2, seed=3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lora_training_on_math_data_with_math_verify(tmp_path):
    pytest.importorskip("math_verify")
    pytest.importorskip("peft")
    data = _math_jsonl(tmp_path / "train.jsonl")
    cfg = TrainConfig(rounds=3, out=tmp_path / "run", progress=False, checkpoint_every=2)
    cfg.task.data, cfg.task.preset, cfg.task.prompt = str(data), "deepscaler", "plain"
    cfg.task.eval_data = (str(_math_jsonl(tmp_path / "bench.jsonl", 8)),)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 4, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.eval.samples, cfg.eval.every = 32, 8, 2, 3
    cfg.model.lora_rank, cfg.model.gradient_checkpointing, cfg.loss.ref_reset_every = 8, True, 3
    cfg.loss.ref_reset_unit = "updates"
    cfg.optim.lr = 1e-3
    result = train(cfg)
    assert result["updates"] == 6 and result["ref_version"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in lines if "rollout/reward_mean" in r]
    assert any(r["rollout/reward_mean"] > 0 for r in rounds)  # math_verify scores the boxed answers
    assert "eval/bench/mean@2" in lines[-1] and "eval/mean@2" in lines[-1]
    ckpt = tmp_path / "run" / "checkpoints" / "round-000003"
    assert (ckpt / "model" / "adapter_config.json").exists()  # the adapter, not a weight copy
    assert (ckpt / "reference" / "config.json").exists()  # the merged base after the resets
    # resume continues from the adapter and the reset base
    cfg.rounds = 4
    assert train(cfg, resume=True)["updates"] == 8


def test_stale_sampler_still_trains(tmp_path, tiny_dir):
    cfg = TrainConfig(rounds=4, out=tmp_path / "run", progress=False, checkpoint_every=0)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.rollout.sync_every = 2, 4, 2
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test, cfg.eval.samples = 24, 8, 4, 0
    train(cfg)
    rounds = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "rollout/sampler_lag" in x]
    # rounds 0 and 2 sample from freshly synced weights; rounds 1 and 3 from weights 2 updates old
    assert [r["rollout/sampler_lag"] for r in rounds] == [0, 2, 0, 2]
    assert [r["buffer/staleness_max"] for r in rounds][1] >= 2


@pytest.mark.parametrize("name,beta,model", [("paper-r1-distill-1.5b", 0.002, "DeepSeek-R1-Distill-Qwen-1.5B"),
                                             ("paper-qwen2.5-math-7b", 0.02, "Qwen2.5-Math-7B")])
def test_paper_presets_are_valid_configs(name, beta, model):
    from pathlib import Path

    from reval.cli import _preset_or_path, _read_config

    cfg = TrainConfig.from_dict(_read_config(_preset_or_path(Path(name)))).validate()
    assert cfg.model.path.endswith(model) and cfg.loss.beta == beta
    assert (cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt, cfg.buffer.capacity) == (128, 8, 5120)
    assert (cfg.updates_per_round, cfg.optim.lr, cfg.rollout.temperature) == (2, 1e-6, 1.0)
    assert cfg.task.preset == "deepscaler" and resolve_template(cfg.task.prompt) == PROMPTS["paper"]


def test_a_reset_on_a_checkpoint_round_keeps_a_verifiable_lora_checkpoint(tmp_path, tiny_dir):
    """A LoRA reference reset restarts the adapter's AdamW state (moments and step at zero, as a
    fresh optimizer's), and the checkpoint written right after it verifies: it used to drop the
    state, so that checkpoint was refused as 'optimizer state is empty' and resume fell back."""
    from reval.checkpoint import verify_checkpoint

    cfg = TrainConfig(rounds=2, out=tmp_path / "run", progress=False, checkpoint_every=2, report_to="none")
    cfg.model.path, cfg.model.lora_rank, cfg.loss.ref_reset_every = str(tiny_dir), 4, 2
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 2, 4
    cfg.buffer.capacity, cfg.task.num_test, cfg.eval.every = 16, 4, 0
    train(cfg)
    state = verify_checkpoint(tmp_path / "run" / "checkpoints" / "round-000002")
    moments = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    assert moments and all(not v.any() for v in moments)  # every adapter weight was reset at round 2
