import warnings

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA or Metal device (opt in: -m gpu)")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield
