"""Shared test fixtures."""

import os

import pytest

try:
    import torch
except ModuleNotFoundError as missing:  # a bare clone: one actionable line instead of an error in every test file
    raise pytest.UsageError(
        f"the tests need avatarcli's dependencies ({missing.name} is not installed): run .ci/run, or "
        "pip install torch==2.13.0 && pip install -e '.[test]' (README, 'Install')") from None


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


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Every test's in-process torch runs on one intra-op thread (as its CLI subprocesses do, OMP_NUM_THREADS=1): the
    models are tiny, and two threads on 2 cores that ffmpeg's encoder and the decode thread share spin-wait for each
    other (a 10 s tiny-weights animate: 3 s on one thread, over 50 s on two while another process was busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is faster than two, and immune to a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
