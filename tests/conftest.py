import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    # The CI machine has 2 cores shared by everything: one intra-op thread keeps tests predictable.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
