import pytest
import torch

from minifilip.memory import peak_extra_bytes, peak_memory_supported

pytestmark = pytest.mark.skipif(not peak_memory_supported(), reason="needs Linux /proc/self/clear_refs")


def test_peak_counts_a_touched_temporary_and_not_earlier_garbage():
    mib = 2**20
    garbage = torch.ones(64 * mib // 4)  # 64 MiB touched, then freed: must not hide the next allocation
    del garbage
    peak = peak_extra_bytes(lambda: torch.ones(48 * mib // 4).sum())  # 48 MiB, freed before fn returns
    assert 40 * mib <= peak <= 80 * mib, peak / mib
    assert peak_extra_bytes(lambda: None) < 8 * mib
