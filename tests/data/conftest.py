"""The tokenizers the data tests encode with, loaded once per session (the assets come from tests/conftest.py)."""

import pytest

from qlora.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def stories(stories260k_dir):
    return Tokenizer.from_pretrained(stories260k_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    return Tokenizer.from_pretrained(smollm2_gguf)
