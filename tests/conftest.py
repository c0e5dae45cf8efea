import pytest
import torch

from reval.model import build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A randomly initialised 2-layer Qwen2 and the char tokenizer, saved in HF format."""
    path = tmp_path_factory.mktemp("tiny")
    tok = build_char_tokenizer()
    model = build_tiny_model(len(tok), hidden=32, layers=2, heads=2, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture()
def tiny(tiny_dir):
    from reval.model import load_model

    torch.manual_seed(0)
    return load_model(tiny_dir)


# -- tiny stand-ins for real checkpoints: built here, never downloaded ----------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_real_style(path, arch: str, vocab_size: int = 0):
    """Save a random tiny `arch` ("qwen2" chat model or "llama" base model) and a tokenizer
    shaped like the real ones: Qwen2 has a chat template, stops on <|im_end|> or
    <|endoftext|> and pads with <|endoftext|>; Llama adds <s> to every encoding and has no
    pad token. `vocab_size` pads the embedding past the tokenizer (large-vocabulary models)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if arch == "qwen2" else ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate([*specials, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    if arch == "qwen2":
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                         additional_special_tokens=["<|im_start|>"])
        hf_tok.chat_template = CHAT_TEMPLATE
        config = Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                             num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
                             vocab_size=max(vocab_size, len(vocab)), eos_token_id=[2, 0], pad_token_id=0)
    else:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>")
        config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                             vocab_size=max(vocab_size, len(vocab)), bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return build_real_style(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return build_real_style(tmp_path_factory.mktemp("llama"), "llama")
