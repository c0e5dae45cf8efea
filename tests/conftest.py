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
