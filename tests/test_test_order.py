"""The order `make test` hands its xdist workers (tests/conftest.py: long modules first, spread over workers)."""

from pathlib import Path
from types import SimpleNamespace

from conftest import long_first_order


def _items(spec):
    return [SimpleNamespace(path=Path(f"tests/{name}"), name=f"{name}::{i}") for name, n in spec for i in range(n)]


def test_long_modules_head_the_worker_slices_and_nothing_is_lost_or_split():
    items = _items([("a.py", 5), ("long1.py", 2), ("b.py", 5), ("long2.py", 2), ("c.py", 6)])
    order = long_first_order(items, 2, {"long1.py": 100, "long2.py": 60})
    assert sorted(i.name for i in order) == sorted(i.name for i in items)          # a permutation
    half = len(items) // 2
    assert [i.path.name for i in order[:2]] == ["long1.py"] * 2                       # longest heads slice 0
    assert [i.path.name for i in order[half:half + 2]] == ["long2.py"] * 2            # next heads slice 1
    rest = [i.name for i in order if i.path.name not in ("long1.py", "long2.py")]
    assert rest == [i.name for i in items if i.path.name not in ("long1.py", "long2.py")]   # collected order kept
    # one worker: the long modules simply come first
    assert [i.path.name for i in long_first_order(items, 1, {"long1.py": 100, "long2.py": 60})[:4]] == \
        ["long1.py"] * 2 + ["long2.py"] * 2
