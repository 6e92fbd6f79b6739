from collections.abc import Iterator

import pytest

from tactician import ids as ids_module
from tactician.ids import new_id, new_ids


@pytest.fixture(autouse=True)
def _restore_the_id_clock() -> Iterator[None]:
    """These tests issue ids far in the future; later tests in the same process must not
    inherit that (ids stay increasing within a process)."""
    saved = ids_module._last_ms, ids_module._last_low
    yield
    ids_module._last_ms, ids_module._last_low = saved


def test_ids_increase_within_a_millisecond_and_across_batches() -> None:
    ids = new_ids(1000, 1_700_000_000.0001) + new_ids(10, 1_700_000_000.0002)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 for i in ids)


def test_ids_sort_by_time_and_survive_a_clock_step_back() -> None:
    early, late = new_id(1_800_000_000.0), new_id(1_800_000_001.0)
    assert early < late
    stepped_back = new_id(1_799_999_000.0)  # the clock jumped back: still after the newest
    assert stepped_back > late
    assert int(late[:12], 16) == 1_800_000_001_000
