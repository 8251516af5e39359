import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one thread; on a busy machine two OpenMP threads that wait for a
    core can make a backward pass hundreds of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
