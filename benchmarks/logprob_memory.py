"""Peak memory of the log-prob computation: full-vocabulary logits vs chunked projection.

    python benchmarks/logprob_memory.py            # defaults: CPU, B=1 x T=2048, ~6 min on 2 cores
    python benchmarks/logprob_memory.py --device cuda --batch 4 --chunks none,ckpt256,256,1024,4096

A tiny Qwen2 (hidden 64, 2 layers) with Qwen2.5's 151,936-token vocabulary, B random
sequences of 128 prompt + (seq - 128) response tokens, fp32. Each configuration does one
forward AND backward of `(logp.sum(1) + v).pow(2).mean()` (logp = per-token log pi of the
response, v = V(s_1) = logsumexp at the first response position):

  hf      `model(input_ids, attention_mask).logits`, then log_softmax + gather (what most
          trainers do: (B, T, V) logits, then a (B, T, V) log-softmax kept for backward)
  none    `sequence_logprobs(chunk_size=None)`: whole sequence projected at once
  ckpt<n> `sequence_logprobs(chunk_size=n, fused=False)`: n positions at a time, each chunk
          under torch.utils.checkpoint (the only chunked path before the fused head; these
          rows are the old `<n>` rows)
  <n>     `sequence_logprobs(chunk_size=n)`: the fused head, n positions at a time, one
          chunk's logits alive in forward and backward

Every configuration runs in a fresh subprocess (no allocator cache carried over) and is
warmed up on one 136-token sequence first, so one-time library setup is not counted. Reported:
peak RSS (ru_maxrss, reset through /proc/self/clear_refs right before the step so the
model build's own peak is not counted) and its increment over the RSS right before the step,
wall seconds, and on CUDA the increment of torch.cuda.max_memory_allocated, each also as a
ratio to the `hf` row. The parent then checks that every configuration's logp, v and
gradients match the `none` reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from reval.buffer import collate
from reval.logprobs import sequence_logprobs
from reval.model import build_tiny_model
from reval.rollout import Experience

PROMPT, GiB = 128, 2**30
GRADS = {"embed/lm_head (tied)": "model.embed_tokens.weight",
         "layer0 q_proj": "model.layers.0.self_attn.q_proj.weight"}


def rss_now() -> int:
    with open("/proc/self/statm") as f:  # Linux: resident pages
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (and ru_maxrss) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:  # then the increment may include the peak of building the model
        return False


def rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def make_batch(vocab: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    exps = []
    for _ in range(batch):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        exps.append(Experience(tuple(ids[:PROMPT]), tuple(ids[PROMPT:]), reward=0.0, group_id=0,
                               group_mean=0.0, group_std=1.0, version=0, round=0, truncated=False))
    return collate(exps, pad_id=0)


def hf_logprobs(model, batch):
    """The usual trainer path: full logits from the model, log_softmax, gather (prompts are all
    PROMPT tokens here, so no padding is involved)."""
    ids = torch.cat([batch.prompt_ids[batch.prompt_index], batch.response_ids], 1)  # (B, P + H)
    logits = model(input_ids=ids).logits[:, PROMPT - 1:-1].float()  # (B, H, V): predicts each answer token
    logp = torch.log_softmax(logits, -1).gather(-1, batch.response_ids[..., None])[..., 0]
    return logp * batch.response_mask, torch.logsumexp(logits[:, 0], -1)


def worker(args) -> None:
    """One configuration in this (fresh) process; prints one JSON line, dumps tensors."""
    dev = torch.device(args.device)
    model = build_tiny_model(args.vocab, hidden=64, layers=2, heads=4, max_len=args.seq).to(dev).train()
    batch, small = (make_batch(args.vocab, b, t) for b, t in ((args.batch, args.seq), (1, PROMPT + 8)))
    batch, small = (type(b)(**{k: v.to(dev) for k, v in vars(b).items()}) for b in (batch, small))
    chunk = None if args.worker in ("hf", "none") else int(args.worker.removeprefix("ckpt"))
    run = hf_logprobs if args.worker == "hf" else (
        lambda m, b: sequence_logprobs(m, b, chunk, shared_prefix=False, fused=not args.worker.startswith("ckpt")))
    logp, v = run(model, small)  # warm-up on 136 tokens: one-time kernel/thread-pool setup
    (logp.sum(1) + v).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    base_rss, reset = rss_now(), reset_peak()
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    logp, v = run(model, batch)
    (logp.sum(1) + v).pow(2).mean().backward()
    if cuda:
        torch.cuda.synchronize()
    wall, peak, r1 = time.perf_counter() - t0, rss_peak(), resource.getrusage(resource.RUSAGE_SELF)
    params = dict(model.named_parameters())
    torch.save({"logp": logp.detach().cpu(), "v": v.detach().cpu(),
                **{k: params[n].grad.cpu() for k, n in GRADS.items()}}, args.dump)
    row = {"config": args.worker, "wall_s": round(wall, 2), "cpu_user_s": round(r1.ru_utime - r0.ru_utime, 2),
           "cpu_sys_s": round(r1.ru_stime - r0.ru_stime, 2), "rss_base_gib": base_rss / GiB,
           "rss_peak_gib": peak / GiB, "rss_incr_gib": (peak - base_rss) / GiB, "peak_reset": reset}
    if cuda:
        row["cuda_peak_incr_gib"] = (torch.cuda.max_memory_allocated() - cuda_base) / GiB
    print(json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (128 prompt + rest response)")
    p.add_argument("--chunks", default="none,ckpt1024,ckpt256,1024,256,128",
                   help="chunk sizes: n = fused head, ckpt<n> = checkpointed chunks, 'none' = unchunked")
    p.add_argument("--no-hf", action="store_true", help="skip the HF-forward baseline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/logprob_memory.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    chunks = [c.strip() for c in args.chunks.split(",")]
    configs = ([] if args.no_hf else ["hf"]) + (["none"] if "none" not in chunks else []) + chunks
    logits_gib = args.batch * (args.seq - 1) * args.vocab * 4 / GiB
    print(f"torch {torch.__version__}, device {args.device}, B={args.batch} T={args.seq} V={args.vocab}: "
          f"full fp32 logits (B*(T-1)*V*4) = {logits_gib:.2f} GiB")
    rows, dumps = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            dumps[cfg] = os.path.join(tmp, f"{cfg}.pt")
            cmd = [sys.executable, __file__, "--worker", cfg, "--dump", dumps[cfg], "--vocab", str(args.vocab),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"config {cfg} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {cfg}: done in {rows[-1]['wall_s']} s", flush=True)
        ref = torch.load(dumps["none"])
        for row in rows:  # correctness against the unchunked reference
            d = torch.load(dumps[row["config"]])
            row["max_abs_diff"] = {k: float((d[k] - ref[k]).abs().max()) for k in ref}
            row["max_abs_ref"] = {k: float(ref[k].abs().max()) for k in ref}
            at_once = args.seq - 1 if row["config"] in ("hf", "none") else \
                min(int(row["config"].removeprefix("ckpt")), args.seq - 1)
            row["logits_at_once_gib"] = args.batch * at_once * args.vocab * 4 / GiB  # one chunk's fp32 logits

    cuda = "cuda_peak_incr_gib" in rows[0]
    key = "cuda_peak_incr_gib" if cuda else "rss_incr_gib"
    hf = next((r[key] for r in rows if r["config"] == "hf"), None)
    for r in rows:
        r["ratio_to_hf"] = r[key] / hf if hf else None  # of the CUDA increment on CUDA, else of RSS
    head = f"{'config':>8} {'peak RSS':>9} {'RSS incr':>9} " + ("CUDA incr " if cuda else "") + \
        f"{'x chunk':>7} {'x hf':>5} {'wall s':>7} {'sys s':>6} {'|dlogp|':>8} {'|dv|':>8} {'rel dgrad':>9}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        dg = max(v / r["max_abs_ref"][k] for k, v in r["max_abs_diff"].items() if k in GRADS)
        print(f"{r['config']:>8} {r['rss_peak_gib']:8.2f}G {r['rss_incr_gib']:8.2f}G "
              + (f"{r['cuda_peak_incr_gib']:8.2f}G " if cuda else "")
              + f"{r[key] / r['logits_at_once_gib']:7.1f} "
              + (f"{r['ratio_to_hf']:5.3f} " if hf else f"{'-':>5} ") + f"{r['wall_s']:7.1f} {r['cpu_sys_s']:6.1f} "
              + f"{r['max_abs_diff']['logp']:8.1e} {r['max_abs_diff']['v']:8.1e} {dg:9.1e}")
    print("(memory in GiB; x chunk = increment / fp32 logits of one chunk (B*chunk*V*4); x hf = increment / hf's;"
          " |dlogp|, |dv| = max abs difference vs 'none'; rel dgrad = max abs grad difference / max abs grad, GRADS)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"vocab": args.vocab, "batch": args.batch, "seq": args.seq, "prompt": PROMPT,
                "hidden": 64, "layers": 2, "heads": 4, "dtype": "float32",
                "loss": "(logp.sum(1) + v).pow(2).mean(), forward + backward",
                "threads": torch.get_num_threads()}
    out.write_text(json.dumps({"settings": settings, "torch": torch.__version__, "device": args.device,
                               "full_logits_fp32_gib": logits_gib, "grads_compared": GRADS,
                               "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=80)
    ax.bar([r["config"] for r in rows], [r[key] for r in rows],
           color=["tab:gray" if r["config"] in ("hf", "none") or r["config"].startswith("ckpt") else "tab:blue"
                  for r in rows])
    ax.axhline(logits_gib, color="tab:red", ls="--", label=f"one fp32 logits tensor ({logits_gib:.2f} GiB)")
    ax.set(xlabel="config (hf / chunk_size: ckpt = checkpointed, else fused)",
           ylabel=f"peak {'CUDA' if cuda else 'RSS'} increment (GiB)",
           title=f"log-probs fwd+bwd, B={args.batch} T={args.seq} V={args.vocab}")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"))


if __name__ == "__main__":
    main()
