import os

import pytest
import torch

import raekern  # noqa: F401  (loads the ops)


def pytest_configure(config):
    torch.manual_seed(0)


def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("RAEKERN_TEST_CUDA", "1") != "0"


@pytest.fixture(params=["cpu"] + (["cuda"] if cuda_available() else []))
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed_each_test():
    """Every test starts from the same RNG state, so a result never depends on which tests ran before."""
    torch.manual_seed(0)
