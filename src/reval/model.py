"""Models and tokenizers: the tiny embedded model, and loading any HF causal LM.

Everything goes through `AutoModelForCausalLM.from_pretrained` /
`AutoTokenizer.from_pretrained`, so the shipped 0.77M-parameter model and a 7B checkpoint
take the same path. The tiny model is a standard Qwen2 with a character-level tokenizer
built with `tokenizers` and saved in HF format (tokenizer.json).
"""

from __future__ import annotations

import json
import string
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
# The tiny model's prompt template. Real models use their chat template instead.
PROMPT_TEMPLATE = "Q: {question}\nA: "
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def default_model_path() -> Path:
    """The shipped warm-start checkpoint (built by `reval pretrain`)."""
    return Path(str(resources.files("reval") / "assets" / "warmstart"))


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII; every character is one token."""
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # keeps "\n" and " "
    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
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


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load `(model, tokenizer)` from a local directory or hub id; clear error if missing."""
    p = Path(path)
    if not p.exists() and (str(path).startswith((".", "/")) or p.suffix):
        raise FileNotFoundError(
            f"model directory {str(path)!r} does not exist; pass a directory written by "
            "`reval pretrain`/`save_pretrained`, or omit it to use the shipped model"
        )
    tokenizer = load_tokenizer(path)
    tokenizer.padding_side = "left"  # generation pads on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_tokenizer(path: str | Path):
    """AutoTokenizer, except for tokenizers saved as plain `tokenizer.json` backends.

    transformers picks the tokenizer class from the model type (Qwen2Tokenizer for a
    Qwen2 config), which replaces our character pre-tokenizer with Qwen's byte-level one.
    A tokenizer saved with the generic backend class is loaded as exactly that.
    """
    cfg = Path(path) / "tokenizer_config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("tokenizer_class") in GENERIC_TOKENIZER_CLASSES:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def format_prompt(tokenizer, question: str, template: str | None = PROMPT_TEMPLATE) -> str:
    """Wrap a question the way training does: the template, or the chat template if None."""
    if template is not None:
        return template.format(question=question)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def prompts_too_long(model, tokenizer, questions: list[str], max_new_tokens: int,
                     template: str | None = PROMPT_TEMPLATE) -> list[tuple[int, int]]:
    """(index, prompt tokens) of each question whose prompt plus answer exceeds the context.

    Models without `max_position_embeddings` in their config are not checked.
    """
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None or not questions:
        return []
    prompts = [format_prompt(tokenizer, q, template) for q in questions]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    return [(i, n) for i, n in enumerate(lengths) if n + max_new_tokens > context]


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
