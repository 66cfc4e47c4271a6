"""Shared test setup: tests use tiny tensors, for which one torch thread is faster than two."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lowres_fixture(tmp_path_factory):
    """A Fashion-MNIST fixture with a teacher trained from configs/fashion_lowres/teacher.yaml
    (tests/lowres_runs.py), shared by every test that runs that folder's transfer configs."""
    from tests.lowres_runs import train_lowres_teacher

    return train_lowres_teacher(tmp_path_factory.mktemp("lowres"))
