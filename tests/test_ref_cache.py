"""The reference cache: what it returns is what the reference would compute, across resets and resumes."""

import pytest
import torch

import reval.loop.learner as learner_mod
import reval.train as train_mod
from reval.config import TrainConfig
from reval.reference import RefCache


def test_cache_hits_only_at_its_version_and_forgets_evicted():
    cache = RefCache()
    uids, mask = torch.tensor([3, 7]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logp, v = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.25, -4.0]]), torch.tensor([2.0, 3.0])
    cache.put(uids, logp, v, mask, version=0)
    got = cache.get(torch.tensor([7, 3]), version=0, H=4)
    assert got[0].tolist() == [[-0.5, -0.25, -4.0, 0.0], [-1.0, -2.0, 0.0, 0.0]] and got[1].tolist() == [3.0, 2.0]
    assert cache.get(uids, version=1, H=3) is None  # a reset made it stale
    assert cache.get(torch.tensor([3, 8]), version=0, H=3) is None  # one row unknown: recompute all
    cache.put(torch.tensor([-1]), logp[:1], v[:1], mask[:1], version=0)  # no uid: never cached
    cache.keep([7])
    assert len(cache) == 1 and cache.get(torch.tensor([3]), 0, 3) is None
    other = RefCache()
    other.load_state_dict(cache.state_dict())
    assert torch.equal(other.get(torch.tensor([7]), 0, 3)[0], cache.get(torch.tensor([7]), 0, 3)[0])


@pytest.mark.parametrize("reset_every", [0, 2])
def test_cached_values_are_what_the_reference_computes(monkeypatch, tiny_dir, tmp_path, reset_every):
    """Every micro-batch served from the cache gets what a fresh reference pass gives it,
    including right after a reference reset (the stale entries are not used)."""
    checked = {"hits": 0, "rows": 0}
    real_update = train_mod.update

    def spy(policy, reference, opt, batch, cfg, old_logp, accelerator, ref_cache, ref_version, *rest):
        for micro in train_mod.micro_batches(batch, cfg.optim.micro_batch_size):
            hit = ref_cache.get(micro.uid, ref_version, micro.response_ids.shape[1])
            checked["rows"] += len(micro)
            if hit is not None:
                want = reference.logprobs(micro, cfg.model.logprob_chunk, cfg.shared_prefix)
                torch.testing.assert_close(hit[0], want[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(hit[1], want[1], atol=1e-5, rtol=1e-5)
                checked["hits"] += len(micro)
        return real_update(policy, reference, opt, batch, cfg, old_logp, accelerator, ref_cache, ref_version, *rest)

    monkeypatch.setattr(learner_mod, "update", spy)
    cfg = TrainConfig(algo="reval", rounds=5, out=tmp_path / "run", progress=False, checkpoint_every=0)
    cfg.model.path = str(tiny_dir)
    cfg.rollout.prompts_per_round, cfg.rollout.samples_per_prompt = 2, 4
    cfg.buffer.capacity, cfg.buffer.updates_per_round = 24, 3
    cfg.optim.micro_batch_size, cfg.task.num_test, cfg.eval.samples = 4, 4, 0
    cfg.loss.ref_reset_every = reset_every
    cfg.optim.lr = 1e-2  # move the policy far from the reference, so a stale entry would show
    train_mod.train(cfg)
    # 5 rounds x (1 fresh + 2 replayed) updates of 8 rows. Without resets every replayed row
    # is a hit; in the 2 rounds that follow a reset only rows cached since then can be.
    assert checked["rows"] == 5 * 3 * 8
    if reset_every == 0:
        assert checked["hits"] == 5 * 2 * 8
    else:
        assert 3 * 2 * 8 <= checked["hits"] < 5 * 2 * 8
