"""Fixtures shared by the test files: a tiny local model instead of anything from the Hub."""
import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (tokenizer included), built once per test session."""
    from stages.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model")
