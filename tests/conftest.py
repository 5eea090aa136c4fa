import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # Integration tests start Ray and MLflow processes; keep them last so unit failures show first.
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)
