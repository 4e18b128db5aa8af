"""Fixtures shared by the test files: a tiny local model instead of anything from the Hub."""
import os

import pytest

# The suite runs on CPU tensors, so the project's Triton kernel (stages/decode_attention.py) is checked
# under Triton's interpreter. Triton reads this when it is imported, so it is set before any test
# imports it (tests/test_decode_attention.py).
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (tokenizer included), built once per test session."""
    from stages.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")
