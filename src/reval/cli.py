"""The `reval` command: train, eval, demo, pretrain.

    reval train [--config FILE.json] [--resume DIR] [--algo reval|tbrm|grpo] [--loss.beta ...]
    reval eval --model DIR --data FILE.jsonl [--out FILE.json]
    reval demo [--out DIR]
    reval pretrain [--out DIR]

Each subcommand's flags come from its dataclass (`reval <cmd> --help`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

USAGE = """usage: reval {train,eval,demo,pretrain} [--help]

  train     train with ReVal, TBRM or GRPO (reval train --help)
  eval      evaluate a model on a JSONL file of question/answer rows
  demo      ReVal vs GRPO from the shipped model, table + plot, a few minutes on a CPU
  pretrain  rebuild the shipped warm-start model
"""


@dataclass
class EvalArgs:
    data: Path
    """JSONL file; each line an object with a question and an answer field."""
    model: str | None = None
    """Model directory; None uses the shipped warm-start model."""
    out: Path | None = None
    """Write accuracy and per-item results to this JSON file."""
    samples: int = 0
    """Also report mean accuracy over this many sampled answers per question."""
    max_new_tokens: int = 64
    """Generation length limit."""
    question_field: str = "question"
    """Name of the question field in each row."""
    answer_field: str = "answer"
    """Name of the answer field in each row."""
    skip_bad_rows: bool = False
    """Skip (and count) bad rows instead of stopping at the first one."""


def load_jsonl(path: Path, question_field: str = "question", answer_field: str = "answer",
               skip_bad_rows: bool = False) -> tuple[list[str], list[str], int]:
    """Read `(questions, answers, num_skipped)` from a JSONL file.

    A bad row (invalid UTF-8 or JSON, not an object, a missing field, an empty question,
    an answer that is not a string or number) raises ValueError naming the file and line,
    unless `skip_bad_rows`, which skips it and counts it.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    questions, answers, errors = [], [], []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            problem = _row_problem(raw, question_field, answer_field)
            if isinstance(problem, str):
                errors.append(f"{path}:{n}: {problem}")
                continue
            questions.append(problem[0])
            answers.append(problem[1])
    if errors and not skip_bad_rows:
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise ValueError(f"{errors[0]}{more}; fix the rows or pass --skip-bad-rows")
    if not questions:
        raise ValueError(f"{path}: no usable rows")
    return questions, answers, len(errors)


def _row_problem(raw: bytes, question_field: str, answer_field: str) -> tuple[str, str] | str:
    """The (question, answer) of one JSONL line, or a string saying what is wrong with it."""
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return "not valid UTF-8"
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg})"
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for f in (question_field, answer_field):
        if f not in row:
            return f"missing field {f!r} (fields: {sorted(row)})"
    q, a = row[question_field], row[answer_field]
    if not isinstance(q, str) or not q.strip():
        return f"field {question_field!r} must be a non-empty string"
    if not isinstance(a, (str, int, float)) or isinstance(a, bool):
        return f"field {answer_field!r} must be a string or number"
    return q, str(a)


def _train(argv: list[str]) -> None:
    from reval.config import TrainConfig
    from reval.train import train

    base, resume = TrainConfig(), False
    argv = list(argv)
    run_dir, config_path = _pop_flag(argv, "--resume"), _pop_flag(argv, "--config")
    if run_dir and config_path:
        raise ValueError("--resume continues a run with its saved config; it cannot take --config")
    if run_dir:
        if not (run_dir / "config.json").is_file():
            raise ValueError(f"--resume {run_dir}: no config.json there; is it a run directory?")
        base = TrainConfig.from_dict(_read_config(run_dir / "config.json"))
        base.out, resume = run_dir, True
    if config_path:
        if not config_path.is_file():
            raise ValueError(f"--config {config_path}: file not found")
        base = TrainConfig.from_dict(_read_config(config_path))
    cfg = tyro.cli(TrainConfig, default=base, args=argv, prog="reval train",
                   description="Train with ReVal, TBRM or GRPO. Also: --config FILE, --resume DIR.")
    result = train(cfg, resume=resume)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))


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
    from reval.evaluate import evaluate
    from reval.model import default_model_path, load_model, prompts_too_long

    args = tyro.cli(EvalArgs, args=argv, prog="reval eval")
    questions, answers, skipped = load_jsonl(args.data, args.question_field, args.answer_field,
                                             args.skip_bad_rows)
    model, tokenizer = load_model(args.model or default_model_path())
    too_long = prompts_too_long(model, tokenizer, questions, args.max_new_tokens)
    if too_long and not args.skip_bad_rows:
        i, n = too_long[0]
        raise ValueError(f"{args.data}: question {i + 1} is {n} tokens; with max_new_tokens="
                         f"{args.max_new_tokens} it exceeds the model's context of "
                         f"{model.config.max_position_embeddings} ({len(too_long)} such rows); "
                         "shorten it or pass --skip-bad-rows")
    drop = {i for i, _ in too_long}
    questions = [q for i, q in enumerate(questions) if i not in drop]
    answers = [a for i, a in enumerate(answers) if i not in drop]
    if skipped or drop:
        print(f"skipped {skipped + len(drop)} bad rows", file=sys.stderr)
    if not questions:
        raise ValueError(f"{args.data}: no usable rows")
    res = evaluate(model, tokenizer, questions, answers, samples=args.samples,
                   max_new_tokens=args.max_new_tokens, keep_items=True)
    print(json.dumps({k: v for k, v in res.items() if k != "items"} | {"n": len(questions)}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")


def _demo(argv: list[str]) -> None:
    from reval.demo import DemoConfig, run_demo

    run_demo(tyro.cli(DemoConfig, args=argv, prog="reval demo"))


def _pretrain(argv: list[str]) -> None:
    from reval.pretrain import PretrainConfig, pretrain

    pretrain(tyro.cli(PretrainConfig, args=argv, prog="reval pretrain"))


COMMANDS = {"train": _train, "eval": _eval, "demo": _demo, "pretrain": _pretrain}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        raise SystemExit(f"error: unknown command {argv[0]!r}\n{USAGE}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars only; HF's per-save bars are noise here
    hf_logging.set_verbosity_error()
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, OSError, FloatingPointError) as e:  # bad input: a message, not a traceback
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt as e:
        raise SystemExit(f"\n{e}" if str(e) else "\ninterrupted") from None


if __name__ == "__main__":
    main()
