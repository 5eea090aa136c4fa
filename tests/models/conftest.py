import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Two CPU cores shared by several engineers: keep the tests on one thread.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
