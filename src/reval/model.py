"""Models, tokenizers and prompts: the tiny embedded model, and loading any HF causal LM.

Everything goes through `AutoModelForCausalLM.from_pretrained` /
`AutoTokenizer.from_pretrained`, so the shipped 0.77M-parameter model and a 7B checkpoint
take the same path. The tiny model is a standard Qwen2 with a character-level tokenizer
built with `tokenizers` and saved in HF format (tokenizer.json).

Prompts are a template with `{question}` (presets in `PROMPTS`, the paper's among them),
optionally wrapped in the tokenizer's chat template. LoRA (peft) is opt-in: the policy is
the base model plus an adapter, and the reference is the same weights with the adapter
disabled (see `reval.reference`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import string
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# The tiny model's prompt template.
PROMPT_TEMPLATE = "Q: {question}\nA: "
PROMPTS = {
    "plain": PROMPT_TEMPLATE,
    # method.md section 8: the paper's prompt for math (used inside the chat template)
    "paper": "{question} Let's think step by step and output the final answer within \\boxed{{}}.",
    "question": "{question}",
}
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def default_model_path(task: str = "add") -> Path:
    """The shipped warm-start checkpoint of an embedded task (built by `reval pretrain --task`)."""
    from reval.tasks import warmstart_path

    return warmstart_path(task)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII; every character is one token.

    Built as a byte-level BPE without merges, with exactly the pipeline transformers'
    `Qwen2Tokenizer` rebuilds (its pre-tokenizer split, byte-level, NFC), so that
    `AutoTokenizer`, which picks `Qwen2Tokenizer` for a Qwen2 config whatever the saved
    tokenizer class, gives the same ids as the saved `tokenizer.json`. The ids are the
    ones the shipped models were trained with: <pad> <eos> <unk>, then the characters.
    """
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # keeps "\n" and " "
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    symbols = [byte_level.pre_tokenize_str(c)[0][0] for c in chars]  # " " -> "Ġ", "\n" -> "Ċ"
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *symbols])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False, byte_fallback=False,
                               continuing_subword_prefix="", end_of_word_suffix=""))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left"
    )


def build_tiny_model(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4,
                     max_len: int = 256, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised Qwen2 small enough to train on two CPU cores."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64 or 256,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_len, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
        bos_token_id=1,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, *,
               attn_implementation: str | None = None, tokenizer_path: str | Path | None = None,
               trust_remote_code: bool = False):
    """Load `(model, tokenizer)` from a local directory or hub id (the tokenizer from
    `tokenizer_path` if given: a checkpoint's reference/ holds weights only); a clear error
    naming the file if the directory is missing, incomplete or damaged.

    Two directories a run writes load as the policy it trained: a LoRA checkpoint's model/
    (a peft adapter: merged into its base model) and a run directory (its newest checkpoint,
    named in one line on stderr)."""
    p = Path(path)
    if not p.exists() and (str(path).startswith((".", "/")) or p.suffix):
        raise FileNotFoundError(
            f"model directory {str(path)!r} does not exist; pass a directory written by "
            "`reval pretrain`/`save_pretrained`, or omit it to use the shipped model"
        )
    if p.is_dir() and _is_run_dir(p):
        p = path = _newest_checkpoint_model(p)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        return _load_merged_lora(p, dtype, attn_implementation=attn_implementation,
                                 trust_remote_code=trust_remote_code)
    if p.is_dir():
        _check_model_dir(p, tokenizer=tokenizer_path is None)
    if p.is_dir() and (p / "latent.json").is_file():  # a latent-action model (reval.latent): policy + world model
        from reval.latent import load_latent

        model = load_latent(p, dtype)
        tokenizer = load_tokenizer(tokenizer_path or path, trust_remote_code=trust_remote_code)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    try:
        tokenizer = load_tokenizer(tokenizer_path or path, trust_remote_code=trust_remote_code)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    except OSError as e:  # hub id not found / offline: transformers' message, minus the traceback
        raise OSError(f"could not load model {str(path)!r}: {e}") from None
    except (ValueError, SafetensorError) as e:  # a damaged file that passed the checks below
        raise OSError(f"could not load model {str(path)!r} ({type(e).__name__}: {e}); is it a complete "
                      "directory written by save_pretrained?") from None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if p.is_dir() and (p / "qadapter.json").is_file():  # a Q-Adapter: the base plus its residual-Q head
        from reval.qhead import load_qadapter

        load_qadapter(model, p)
    return model, tokenizer


def _is_run_dir(p: Path) -> bool:
    """A `reval train` output directory: its config.json is a run's (no `model_type`), or it
    has checkpoints/ and no config.json."""
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (p / "checkpoints").is_dir()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False  # _check_model_dir names the damaged file
    return isinstance(config, dict) and "algo" in config and "model_type" not in config


def _newest_checkpoint_model(run: Path) -> Path:
    """model/ of the run's newest checkpoint (complete: written under a temporary name, then
    renamed), said on stderr, since the user named the run and not the round."""
    from reval.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise OSError(f"{run} is a run directory with no checkpoint (nothing in {run / 'checkpoints'}); "
                      "train until one is written (--checkpoint-every), or pass a model directory")
    print(f"{run} is a run directory: loading its newest checkpoint, {ckpt / 'model'}", file=sys.stderr)
    return ckpt / "model"


def _load_merged_lora(adapter: Path, dtype: torch.dtype, **kwargs):
    """A LoRA checkpoint's model/ (a peft adapter, no weights of its own) merged into its base
    (peft's `merge_and_unload`): a plain HF model of the trained policy, as fast as the base.

    The base is the checkpoint's reference/ when there is one (a reference reset merged the
    earlier adapter into the base weights, as `reval.loop.build.load_policy` does on resume),
    else the model adapter_config.json names (`base_model_name_or_path`)."""
    config_file = adapter / "adapter_config.json"
    named_by = f"base_model_name_or_path in {config_file}"
    if (adapter.parent / "reference" / "config.json").is_file():
        base, named_by = str(adapter.parent / "reference"), "the checkpoint's reference/, the base after a reset"
    else:
        try:
            base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError) as e:
            raise OSError(f"{config_file} is unreadable ({type(e).__name__}: {e}); the LoRA checkpoint is "
                          "damaged") from None
        if not base:
            raise OSError(f"{config_file} names no base model (base_model_name_or_path); set it to the "
                          "model the adapter was trained on")
    own_tokenizer = any((adapter / f).is_file() for f in TOKENIZER_FILES)  # reference/ holds weights only
    try:
        if base.startswith(("/", ".")) and not Path(base).exists():
            raise FileNotFoundError("it does not exist")
        model, tokenizer = load_model(base, dtype, tokenizer_path=adapter if own_tokenizer else None, **kwargs)
    except OSError as e:
        raise OSError(f"the LoRA checkpoint {adapter} is an adapter on the base model {base!r} ({named_by}), "
                      f"which could not be loaded ({e}). Put the base model back at {base!r}, or set "
                      f"base_model_name_or_path in {config_file} to where it is now") from None
    from peft import PeftModel

    try:
        with no_peft_deprecation_warning():
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise OSError(f"could not apply the LoRA adapter {adapter} to {base!r} ({type(e).__name__}: {e}); "
                      "is it the base model the adapter was trained on, and the adapter complete?") from None
    return model, tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_model_dir(p: Path, tokenizer: bool = True) -> None:
    """A local model directory has a readable config, a tokenizer and weights; else an error
    naming the file (transformers would fail deep inside, or quietly build an empty tokenizer)."""
    def readable_json(name: str) -> None:
        try:
            json.loads((p / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise OSError(f"{p / name} is unreadable ({type(e).__name__}: {e}); the model directory is "
                          "damaged: write it again with save_pretrained") from None

    if not (p / "config.json").is_file():
        raise OSError(f"{p / 'config.json'} is missing: {p} is not a model directory written by "
                      "save_pretrained")
    readable_json("config.json")
    if tokenizer and not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise OSError(f"{p} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
                      "next to the weights (tokenizer.save_pretrained)")
    for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer else ():
        if (p / name).is_file():
            readable_json(name)
    weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("pytorch_model*.bin"))
    if not weights:
        raise OSError(f"{p} holds no weights (no *.safetensors)")
    for w in (w for w in weights if w.suffix == ".safetensors"):
        try:
            with safe_open(str(w), framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise OSError(f"{w} is unreadable ({e}); the weights are damaged") from None


def eos_token_ids(model, tokenizer) -> list[int]:
    """Tokens that end an answer: the tokenizer's EOS plus the generation config's.

    Chat models often stop on several tokens (Qwen2.5: <|im_end|> and <|endoftext|>);
    generation and the EOS cut must agree on all of them.
    """
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if i is not None and i not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer and the model's generation config define no EOS token; "
                         "set tokenizer.eos_token so answers can end")
    return ids


def add_lora(model, rank: int, alpha: float, target_modules: str | list[str] = "all-linear",
             dropout: float = 0.0):
    """Wrap `model` in a trainable LoRA adapter (peft); the base weights are frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("LoRA needs peft (a dependency of reval): pip install peft") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                        target_modules=target_modules)
    with no_peft_deprecation_warning():
        return get_peft_model(model, config)


@contextlib.contextmanager
def no_peft_deprecation_warning():
    """Around wrapping a model in peft: peft (0.21) reads `model.is_gradient_checkpointing`,
    which transformers 5 deprecates with a FutureWarning on every LoRA run. The call is peft's,
    not ours, so exactly that warning is silenced, only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        yield


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """AutoTokenizer, except for tokenizers saved as plain `tokenizer.json` backends.

    transformers picks the tokenizer class from the model type (Qwen2Tokenizer for a
    Qwen2 config), which replaces our character pre-tokenizer with Qwen's byte-level one.
    A tokenizer saved with the generic backend class is loaded as exactly that.
    """
    cfg = Path(path) / "tokenizer_config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"  # generation pads on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def auto_prompt(chat: bool, embedded: bool = False) -> str:
    """The prompt preset `auto` means, the same in training and evaluation: "plain" (the
    shipped models' format) for the embedded task and for a model without a chat template,
    "paper" (ask for a boxed answer) inside a chat template."""
    return "paper" if chat and not embedded else "plain"


def resolve_template(prompt: str) -> str:
    """A preset name from `PROMPTS`, or a format string containing `{question}`."""
    template = PROMPTS.get(prompt, prompt)
    try:
        ok = "{question}" in template and template.format(question="") is not None
    except (KeyError, IndexError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"prompt {prompt!r} is neither a preset ({', '.join(PROMPTS)}) nor a format "
                         "string with one {question} field (write literal braces as {{ }})")
    return template


def use_chat_template(tokenizer, mode: str) -> bool:
    """Resolve `model.chat_template` ("auto" / "on" / "off") for this tokenizer."""
    has = getattr(tokenizer, "chat_template", None) is not None
    if mode == "on" and not has:
        raise ValueError("model.chat_template = 'on' but the tokenizer has no chat template; "
                         "use 'off' (plain prompt) or a chat model")
    return has if mode == "auto" else mode == "on"


def format_prompt(tokenizer, question: str, template: str = PROMPT_TEMPLATE, chat: bool = False) -> str:
    """The text the model sees for `question`: the template, inside the chat template if `chat`.

    Prompts are later tokenised without special tokens, so a chat template's own BOS is
    kept exactly once; for a plain template the tokenizer's BOS is written out when the
    tokenizer would normally add one (Llama-style tokenizers).
    """
    text = template.format(question=question)
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    bos = tokenizer.bos_token
    if bos and tokenizer.bos_token_id in tokenizer("x")["input_ids"][:1]:
        return bos + text
    return text


def prompts_too_long(model, tokenizer, questions: list[str], max_new_tokens: int,
                     template: str = PROMPT_TEMPLATE, chat: bool = False,
                     batch_size: int = 4096) -> list[tuple[int, int]]:
    """(index, prompt tokens) of each question whose prompt plus answer exceeds the context.

    Prompts are formatted and tokenised `batch_size` at a time and only the offenders are
    kept, so memory does not grow with the number of questions (a million questions at once
    took 10 GB). Models without `max_position_embeddings` in their config are not checked.
    """
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None or not questions:
        return []
    too_long = []
    for start in range(0, len(questions), batch_size):
        prompts = [format_prompt(tokenizer, q, template, chat) for q in questions[start:start + batch_size]]
        ids = tokenizer(prompts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        too_long += [(start + i, len(x)) for i, x in enumerate(ids) if len(x) + max_new_tokens > context]
    return too_long


def cache_argument(decoder) -> str:
    """The name of a decoder's KV-cache argument and output: `cache` (transformers >= 5.2x)
    or `past_key_values` (earlier)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
