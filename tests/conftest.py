"""Shared test fixtures."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """The prompt-embedding cache of every test run (and of the CLI subprocesses it starts) lives in a temp folder,
    never in the user's ~/.cache."""
    before = os.environ.get("AVATARCLI_CACHE_DIR")
    os.environ["AVATARCLI_CACHE_DIR"] = str(tmp_path_factory.mktemp("avatarcli-cache"))
    yield
    if before is None:
        os.environ.pop("AVATARCLI_CACHE_DIR", None)
    else:
        os.environ["AVATARCLI_CACHE_DIR"] = before


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster than two, and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
