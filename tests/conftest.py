from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the training scripts")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
