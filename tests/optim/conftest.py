"""tests/optim runs tiny tensors: one intra-op thread is fastest for them, and immune to the
spin-wait slowdowns that several threads suffer when other processes share the cores."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
