"""Q-Adapter (docs/qadapter.md): the residual-Q head starts as the base model (whatever alpha_0)
and only it trains; the loss on hand-computed tensors and its gamma = 1 identity; the head
survives a save / load and a resume; the LoRA module trains an adapter whose reference is the
base (adapter off); the configurations it cannot run are refused."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from reval.buffer import collate
from reval.config import TrainConfig
from reval.data import PreferencePair
from reval.logprobs import sequence_logprobs
from reval.losses.qadapter import qadapter_loss
from reval.model import load_model
from reval.offline import to_experiences
from reval.qhead import WEIGHTS, attach_qadapter, is_qadapter, load_qadapter, save_qadapter
from reval.rollout import generate
from reval.train import train

PAIRS = [PreferencePair("Q: 12+3\nA: ", "15", "16"), PreferencePair("Q: 12+3\nA: ", "15.", "5"),
         PreferencePair("Q: 7*8\nA: ", "56", "54"), PreferencePair("Q: 9-4\nA: ", "5", "four")]


def _pairs_batch(tok, pairs=PAIRS):
    """(chosen, rejected) rows of `pairs`, as a training round builds them."""
    exps = to_experiences(pairs, tok, template="{question}", chat=False, eos_id=tok.eos_token_id, version=0,
                          round=0, first_group_id=0, first_uid=0)
    return collate(exps, tok.pad_token_id)


def _randomise(head, seed=1):
    """A nonzero residual (the trained state, without training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (head.up.weight, head.down.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _greedy(model, tok):
    return generate(model, tok, ["Q: 12+3\nA: ", "Q: 7\nA: "], max_new_tokens=8, greedy=True).response_ids


@torch.no_grad()
def _logp(model, batch):
    return sequence_logprobs(model, batch)[0]


# -- (a) the head starts as the base; with the residual off it is the base --------------------

@pytest.mark.parametrize("alpha, alpha0", [(1.0, 1.0), (2.0, 0.5)])
def test_head_starts_as_the_base_and_residual_off_is_the_base(tiny, alpha, alpha0):
    """log pi = log_softmax(log pi_base + Q_res / alpha~) with Q_res = 0: the base, for any alpha_0."""
    model, tok = tiny
    batch = _pairs_batch(tok)
    base_logp, base_greedy = _logp(model, batch), _greedy(model, tok)

    head = attach_qadapter(model, width=8, alpha=alpha, alpha0=alpha0)  # Q_res = 0
    assert is_qadapter(model)
    torch.testing.assert_close(_logp(model, batch), base_logp, atol=1e-6, rtol=0)
    assert _greedy(model, tok) == base_greedy

    _randomise(head)
    assert (_logp(model, batch) - base_logp).abs().max() > 1e-2  # the residual changes the policy
    with head.residual_off():
        assert torch.equal(_logp(model, batch), base_logp)
        assert _greedy(model, tok) == base_greedy
    assert head.residual  # switched back on


# -- (b) only the head trains -----------------------------------------------------------------

def test_attach_freezes_the_base_and_leaves_the_head_trainable(tiny):
    model, _ = tiny
    attach_qadapter(model, width=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lm_head.up.weight", "lm_head.up.bias", "lm_head.down.weight"}
    assert not model.get_output_embeddings().down.weight.any()  # zero-initialised


def test_a_train_run_changes_only_the_head(runs, tiny_dir):
    from safetensors.torch import load_file

    model_dir = runs["part"] / "checkpoints" / "round-000002" / "model"
    base, saved = load_file(str(tiny_dir / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert saved.keys() == base.keys()
    assert all(torch.equal(saved[k], base[k]) for k in base)  # the frozen model, bit for bit
    head = load_file(str(model_dir / WEIGHTS))
    assert set(head) == {"up.weight", "up.bias", "down.weight"}
    assert head["down.weight"].abs().max() > 0  # the residual learned something


# -- (c) the loss on hand-computed tensors ----------------------------------------------------

# One pair: chosen 3 tokens, rejected 2 (+ 1 pad, whose garbage the mask must drop).
# alpha = 1, alpha0 = 0.5, chi2 = 0.1.
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.4, -3.0, -7.0]])
BASE = torch.tensor([[-2.0, -1.0, -1.0], [-1.0, -2.0, -3.0]])
V = torch.tensor([[0.5, 1.0, 0.2], [2.0, 0.1, 4.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# Q(s_t, a_t) = alpha (logp + v) - alpha0 base:
#   chosen   (-1 + .5) + 1 = 0.5,  (-.5 + 1) + .5 = 1.0,  (-2 + .2) + .5 = -1.3
#   rejected (-.4 + 2) + .5 = 2.1, (-3 + .1) + 1 = -1.9          token mean 0.4 / 5 = 0.08
# r_t = Q(s_t, a_t) - gamma V(s_t), V(s_t) = alpha v_t (the SAME state):
#   gamma = 1:   chosen   0.5 - 0.5 = 0,      1.0 - 1.0 = 0,    -1.3 - 0.2 = -1.5    R = -1.5
#                rejected 2.1 - 2.0 = 0.1,   -1.9 - 0.1 = -2.0                       R = -1.9
#                (= alpha logp - alpha0 base token by token); z = 0.4
#                mean r^2 = (0 + 0 + 2.25 + 0.01 + 4.0) / 5 = 1.252
#   gamma = 0.9: chosen   0.5 - 0.45 = 0.05,  1.0 - 0.9 = 0.1,  -1.3 - 0.18 = -1.48  R = -1.33
#                rejected 2.1 - 1.8 = 0.3,   -1.9 - 0.09 = -1.99                     R = -1.69
#                z = 0.36; mean r^2 = (0.0025 + 0.01 + 2.1904 + 0.09 + 3.9601) / 5 = 1.2506
# loss = -log sigmoid(z) + 0.1 mean r^2:
#   gamma = 1:   log(1 + e^-0.4)  + 0.1252  = 0.513015 + 0.1252  = 0.638215
#   gamma = 0.9: log(1 + e^-0.36) + 0.12506 = 0.529260 + 0.12506 = 0.654320
HAND = {  # gamma: (R(chosen), R(rejected), mean r^2 over the 5 tokens, loss)
    1.0: (-1.5, -1.9, 1.252, 0.638215),
    0.9: (-1.33, -1.69, 1.2506, 0.654320),
}


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_loss_on_hand_computed_tensors(gamma):
    chosen, rejected, chi, total = HAND[gamma]
    z = chosen - rejected
    preference = math.log1p(math.exp(-z))  # -log sigmoid(z)
    assert preference + 0.1 * chi == pytest.approx(total, abs=1e-6)  # the hand numbers agree
    loss, m = qadapter_loss(LOGP, BASE, V, MASK, alpha=1.0, alpha0=0.5, gamma=gamma, chi2=0.1)
    assert loss.item() == pytest.approx(total, abs=1e-5)
    assert m["loss/preference"] == pytest.approx(preference, abs=1e-5)
    assert m["loss/chi2"] == pytest.approx(chi, abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(chosen, abs=1e-5)
    assert m["rewards/rejected"] == pytest.approx(rejected, abs=1e-5)
    assert m["rewards/margin"] == pytest.approx(z, abs=1e-5)
    assert m["rewards/accuracy"] == 1.0  # the chosen answer's implied reward is higher
    assert m["q/q_mean"] == pytest.approx(0.08, abs=1e-5)

    # in a micro-batch of a larger batch (2 pairs, 10 answer tokens) the loss takes the whole
    # batch's counts; the logged loss/chi2 stays this micro-batch's own token mean
    loss, m = qadapter_loss(LOGP, BASE, V, MASK, alpha=1.0, alpha0=0.5, gamma=gamma, chi2=0.1,
                            num_pairs=2, num_tokens=10)
    assert loss.item() == pytest.approx(preference / 2 + 0.1 * chi * 5 / 10, abs=1e-5)
    assert m["loss/chi2"] == pytest.approx(chi, abs=1e-5)


def test_loss_refuses_an_odd_number_of_rows():
    with pytest.raises(ValueError, match="row pairs"):
        qadapter_loss(LOGP[:1], BASE[:1], V[:1], MASK[:1])


# -- (d) the telescoping identity -------------------------------------------------------------

def test_with_gamma_1_the_answer_reward_is_the_log_ratio_sum(tiny):
    """gamma = 1: r_t = alpha log pi - alpha0 log pi_base token by token, so
    R(y) = sum_t [alpha log pi(a_t|s_t) - alpha0 log pi_base(a_t|s_t)] exactly (no V term);
    gamma < 1 adds (1 - gamma) alpha v_t per token."""
    model, tok = tiny
    alpha, alpha0 = 2.0, 0.5
    head = attach_qadapter(model, width=8, alpha=alpha, alpha0=alpha0)
    _randomise(head)
    batch = _pairs_batch(tok)
    mask = batch.response_mask
    with torch.no_grad():
        logp, v = sequence_logprobs(model, batch, all_values=True)
        with head.residual_off():
            base = sequence_logprobs(model, batch)[0]
    assert v.abs().max() > 1e-2  # the residual moved V(s_t) off 0, so a V term would show
    _, m = qadapter_loss(logp, base, v, mask, alpha=alpha, alpha0=alpha0, gamma=1.0, chi2=0.0)
    sums = ((alpha * logp - alpha0 * base) * mask).sum(-1)  # (2N,)
    assert m["rewards/chosen"] == pytest.approx(sums[0::2].mean().item(), abs=1e-4)
    assert m["rewards/rejected"] == pytest.approx(sums[1::2].mean().item(), abs=1e-4)
    assert m["rewards/margin"] == pytest.approx((sums[0::2] - sums[1::2]).mean().item(), abs=1e-4)
    _, m09 = qadapter_loss(logp, base, v, mask, alpha=alpha, alpha0=alpha0, gamma=0.9, chi2=0.0)
    sums09 = sums + (0.1 * alpha * v * mask).sum(-1)
    assert m09["rewards/chosen"] == pytest.approx(sums09[0::2].mean().item(), abs=1e-4)
    assert abs(m09["rewards/margin"] - m["rewards/margin"]) > 1e-3  # gamma < 1: V(s_t) counts


# -- (e) save / load --------------------------------------------------------------------------

def test_save_then_load_model_gives_the_same_policy(tiny, tmp_path):
    model, tok = tiny
    _randomise(attach_qadapter(model, width=8, alpha=2.0, alpha0=0.5))
    batch = _pairs_batch(tok)
    save_qadapter(model, tmp_path / "qa")
    tok.save_pretrained(tmp_path / "qa")
    assert json.loads((tmp_path / "qa" / "qadapter.json").read_text()) == {"width": 8, "alpha": 2.0, "alpha0": 0.5}
    assert is_qadapter(model)  # saving put the head back

    loaded, _ = load_model(tmp_path / "qa")
    assert is_qadapter(loaded)
    assert torch.equal(_logp(loaded, batch), _logp(model, batch))
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_head_is_an_oserror_naming_the_file(tiny, tiny_dir, tmp_path, damage):
    model, tok = tiny
    attach_qadapter(model, width=8)
    save_qadapter(model, tmp_path / "qa")
    tok.save_pretrained(tmp_path / "qa")
    weights = tmp_path / "qa" / WEIGHTS
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-16])
    else:
        weights.unlink()
    with pytest.raises(OSError, match=WEIGHTS):
        load_model(tmp_path / "qa")
    with pytest.raises(OSError, match=WEIGHTS):  # direct use, past load_model's header check
        load_qadapter(load_model(tiny_dir)[0], tmp_path / "qa")


# -- (f) a run, a resume, and the customised policy from a checkpoint -------------------------

def _cfg(tiny_dir, data, out, rounds: int, algo: str = "qadapter") -> TrainConfig:
    cfg = TrainConfig(algo=algo, rounds=rounds, out=out, progress=False, checkpoint_every=1)
    cfg.model.path, cfg.task.data = str(tiny_dir), str(data)
    cfg.model.qadapter_hidden = 8
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 2, 2
    cfg.buffer.capacity, cfg.optim.micro_batch_size, cfg.optim.lr = 8, 4, 1e-2
    cfg.loss.qadapter_alpha0 = 0.5  # the head's config must travel with it
    return cfg


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """An uninterrupted 3-round run, and a 2-round run resumed to round 3."""
    root = tmp_path_factory.mktemp("qadapter")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in PAIRS))
    full = train(_cfg(tiny_dir, data, root / "full", 3))
    part = train(_cfg(tiny_dir, data, root / "part", 2))
    shutil.copytree(root / "part", root / "part_at_2")  # round 2 as it was, before the resume adds round 3
    resumed = train(_cfg(tiny_dir, data, root / "part", 3), resume=True)
    return {"data": data, "full": root / "full", "part": root / "part_at_2", "resumed": root / "part",
            "counters": (full, part, resumed)}


def _head(run: Path, round_: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"round-{round_:06d}" / "model" / WEIGHTS))


def test_resume_continues_the_run_as_if_uninterrupted(runs):
    full, part, resumed = runs["counters"]
    assert part["round"] == 2 and resumed["round"] == full["round"] == 3
    assert resumed["updates"] == full["updates"] == 3 and resumed["samples"] == full["samples"]
    a, b = _head(runs["full"], 3), _head(runs["resumed"], 3)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert not torch.equal(_head(runs["part"], 2)["down.weight"], a["down.weight"])  # round 3 did learn
    from reval.metrics import read_metrics

    rows = [r for r in read_metrics(runs["resumed"] / "metrics.jsonl") if "loss/chi2" in r]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert {"loss/preference", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy",
            "q/q_mean"} <= rows[0].keys()


def test_the_checkpoint_loads_as_the_customised_policy(runs, tiny_dir):
    from reval.data import load_preferences

    model_dir = runs["full"] / "checkpoints" / "round-000003" / "model"
    policy, tok = load_model(model_dir)  # what `reval eval --model DIR` does
    base, _ = load_model(tiny_dir)
    head = policy.get_output_embeddings()
    assert is_qadapter(policy) and (head.alpha, head.alpha0, head.width) == (1.0, 0.5, 8)
    batch = _pairs_batch(tok, load_preferences(runs["data"]))
    assert (_logp(policy, batch) - _logp(base, batch)).abs().max() > 1e-3  # not the base
    with head.residual_off():
        assert torch.equal(_logp(policy, batch), _logp(base, batch))


# -- (g) what Q-Adapter cannot run ------------------------------------------------------------

def test_validate_refuses_reference_resets_and_accepts_lora():
    cfg = TrainConfig(algo="qadapter")
    cfg.model.lora_rank = 8  # the authors' module
    cfg.validate()
    cfg.loss.ref_reset_every = 5
    with pytest.raises(ValueError, match=r"loss.ref_reset_every = 5 is invalid"):
        cfg.validate()
    cfg.algo = "dpo"
    cfg.validate()  # only qadapter is refused


@pytest.mark.parametrize("algo", ["dpo", "qadapter"])
def test_training_from_a_qadapter_directory_is_refused(runs, tmp_path, algo):
    model_dir = runs["full"] / "checkpoints" / "round-000003" / "model"
    cfg = _cfg(model_dir, runs["data"], tmp_path / "run", 1, algo=algo)
    with pytest.raises(ValueError, match="is a Q-Adapter.*train from its base model"):
        train(cfg)


def test_the_head_runs_on_a_bfloat16_model(tiny_dir):
    """The head stays float32 on a bfloat16 model (a bug once: a dtype mismatch in Q_res)."""
    model, tok = load_model(tiny_dir, torch.bfloat16)
    batch = _pairs_batch(tok)
    base_logp = _logp(model, batch)
    head = attach_qadapter(model, width=8)
    assert head.up.weight.dtype == torch.float32
    torch.testing.assert_close(_logp(model, batch), base_logp, atol=1e-5, rtol=0)
    _randomise(head)
    assert (_logp(model, batch) - base_logp).abs().max() > 1e-2


def test_save_from_gathered_weights(tiny, tmp_path):
    """FSDP / ZeRO-3 checkpoints pass the full weights as `state_dict` (the live modules hold
    shards): the head's tensors go to its own file, the base's under their plain names."""
    model, tok = tiny
    head = attach_qadapter(model, width=8)
    _randomise(head)
    batch = _pairs_batch(tok)
    gathered = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # what a rank's shard looks like: not the full weights
        for p in model.parameters():
            p.zero_()
    save_qadapter(model, tmp_path / "qa", state_dict=gathered)
    tok.save_pretrained(tmp_path / "qa")
    model.load_state_dict(gathered)
    loaded, _ = load_model(tmp_path / "qa")
    assert torch.equal(_logp(loaded, batch), _logp(model, batch))


# -- (h) the authors' module: a LoRA adapter (--model.lora-rank) --------------------------------

def test_a_lora_run_trains_an_adapter_and_leaves_the_base(runs, tiny_dir, tmp_path):
    """--algo qadapter --model.lora-rank 4: model/ is a peft adapter (no head, no base weights);
    the adapter changes the policy, and with the adapter off the model is the base (the reference)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    cfg = _cfg(tiny_dir, runs["data"], tmp_path / "lora", 1)
    cfg.model.lora_rank, cfg.model.lora_alpha = 4, 8
    assert train(cfg)["updates"] == 1
    model_dir = tmp_path / "lora" / "checkpoints" / "round-000001" / "model"
    assert (model_dir / "adapter_config.json").is_file() and (model_dir / "adapter_model.safetensors").is_file()
    assert not (model_dir / "qadapter.json").exists() and not (model_dir / WEIGHTS).exists()
    assert not (model_dir / "model.safetensors").exists()  # the base is not rewritten
    assert not (model_dir.parent / "reference").exists()  # no reference reset: the base is the prior
    adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_dir) and adapter_config["r"] == 4
    weights = load_file(str(model_dir / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # the adapter learned

    base, tok = load_model(tiny_dir)
    batch = _pairs_batch(tok)
    base_logp = _logp(base, batch)
    policy = PeftModel.from_pretrained(load_model(tiny_dir)[0], model_dir)
    assert not is_qadapter(policy)
    assert (_logp(policy, batch) - base_logp).abs().max() > 1e-4  # the customised policy
    with policy.disable_adapter():
        assert torch.equal(_logp(policy, batch), base_logp)  # adapter off: pi_base, bit for bit


def test_with_lora_the_first_update_starts_at_the_base(tiny_dir):
    """B = 0 at the start: at the first update the policy's log-probs are the reference's,
    so with alpha~ = alpha_0 every r_t is 0 (margin 0, preference term log 2, chi2 0)."""
    import reval.train as train_mod
    from reval.loop import build
    from reval.distributed import LogProbModule, make_accelerator

    cfg = TrainConfig(algo="qadapter")
    cfg.model.path, cfg.model.lora_rank, cfg.model.lora_alpha = str(tiny_dir), 4, 8
    cfg.loss.qadapter_alpha = cfg.loss.qadapter_alpha0 = 0.5
    cfg.optim.micro_batch_size = 4
    model, tok = build.load_policy(cfg, None, tiny_dir)
    assert not is_qadapter(model)  # the LoRA module replaces the head
    assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
    assert cfg.loss.gamma == 1.0
    reference = build.make_reference(cfg, model, None, tiny_dir, make_accelerator("no"))
    batch = _pairs_batch(tok)
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(model, batch)[0], reference.logprobs(batch)[0])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    m = train_mod.update(LogProbModule(model), reference, optimizer, batch, cfg)
    assert m["rewards/margin"] == 0.0 and m["loss/chi2"] == 0.0
    assert m["loss/preference"] == pytest.approx(math.log(2), abs=1e-7)
    with torch.no_grad():  # the update moved the adapter: no longer the reference
        assert not torch.equal(sequence_logprobs(model, batch)[0], reference.logprobs(batch)[0])
