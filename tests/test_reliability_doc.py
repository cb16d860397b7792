"""Every test RELIABILITY.md names exists: a file named there is in tests/, and a test function named
there (``file.py::test_x`` or a bare ``test_x``) is defined in that file or, when bare, in some test file."""

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DOC = TESTS.parent / "RELIABILITY.md"


def defined_tests() -> dict[str, set[str]]:
    return {p.name: set(re.findall(r"^\s*def (test_\w+)", p.read_text(encoding="utf-8"), flags=re.M))
            for p in TESTS.glob("test_*.py")}


def test_every_test_that_reliability_md_names_exists():
    text = DOC.read_text(encoding="utf-8")
    tests = defined_tests()
    everywhere = set().union(*tests.values())
    missing = []
    for file, name in re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?", text):
        if file not in tests:
            missing.append(file)
        elif name and name not in tests[file]:
            missing.append(f"{file}::{name}")
    bare = set(re.findall(r"`(test_\w+)`", text)) | set(re.findall(r"(?<![:\w])(test_\w+)(?=[`,\s])", text))
    missing += sorted(n for n in bare if not n.endswith(".py") and n not in everywhere and n + ".py" not in tests)
    assert not missing, f"RELIABILITY.md names tests that do not exist: {missing}"
