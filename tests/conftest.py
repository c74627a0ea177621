import os

import torch

if not torch.cuda.is_available():
    # Before anything imports triton: without a GPU its kernels run in the interpreter on CPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# pytest runs with --import-mode=importlib, which puts no test directory on sys.path; the
# helper module of tiny models is imported by its folder.
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import tiny_models  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: the tensors of tiny models are too small to
    share, and two threads on a loaded two-core machine mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny():
    """The :mod:`tiny_models` helper: ``tiny.wrap(family)``, ``tiny.samples(family)``, ..."""
    return tiny_models


@pytest.fixture
def make_model():
    """``make_model(family, seed=0, dtype=torch.float32)``: a fresh tiny ``canfast.Model``."""
    return tiny_models.wrap


@pytest.fixture(scope="module")
def llava():
    """A tiny LLaVA shared by a module's tests; tests must leave it as they found it."""
    return tiny_models.wrap("llava")
