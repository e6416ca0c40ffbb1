"""The HF tests train tiny models, whose ops are far too small to gain from intra-op threads; one
thread keeps them fast on a shared 2-core runner (threads spinning at OpenMP barriers cost more
than the ops) and is restored afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
