"""What reval writes loads correctly through plain transformers: `AutoTokenizer` and
`AutoModelForCausalLM` alone give the same ids and the same answers as reval's loader."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reval.config import TrainConfig
from reval.model import PROMPT_TEMPLATE, default_model_path, load_model
from reval.tasks import TASKS
from reval.train import train


def _same_as_reval(path, reval_model, reval_tok, task="add"):
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    problems = TASKS[task].split("test", 4, seed=0)
    for p in problems:
        prompt = PROMPT_TEMPLATE.format(question=p.question)
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == reval_tok(prompt).input_ids
        assert tok.decode(ids[0]) == prompt
        with torch.no_grad():
            ours = reval_model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=reval_tok.pad_token_id)
            theirs = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        assert theirs.tolist() == ours.tolist()
    return tok


@pytest.mark.parametrize("task", ["add", "mul"])
def test_the_shipped_models_load_with_auto_classes(task):
    path = default_model_path(task)
    tok = _same_as_reval(path, *load_model(path), task=task)
    assert len(tok) == 99 and tok.eos_token == "<eos>" and tok.pad_token == "<pad>"


@pytest.mark.parametrize("lora", [0, 4])
def test_a_trained_checkpoint_loads_with_auto_classes(lora, tiny_dir, tmp_path):
    cfg = TrainConfig(rounds=1, out=tmp_path / "run", progress=False, checkpoint_every=1)
    cfg.model.path, cfg.model.lora_rank = str(tiny_dir), lora
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 4, 4
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.task.num_test, cfg.eval.samples = 32, 8, 8, 0
    cfg.optim.lr = 1e-2  # weights visibly different from the start
    train(cfg)
    path = tmp_path / "run" / "checkpoints" / "round-000001" / "model"
    if lora:
        from peft import PeftModel

        assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
        base, tok = load_model(tiny_dir)
        ours = PeftModel.from_pretrained(base, path).merge_and_unload()
    else:
        ours, tok = load_model(path)
    start = load_model(tiny_dir)[0]
    assert not all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), start.state_dict().values()))
    _same_as_reval(path, ours, tok)
