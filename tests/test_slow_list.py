"""The slow-test list of conftest.py names only tests and files that exist, so a renamed or
removed test cannot silently move the remaining ones back into the fast suite or vanish from
both."""

import re
from pathlib import Path

import conftest

HERE = Path(__file__).resolve().parent


def test_slow_list_names_existing_tests():
    for name in conftest._SLOW_FILES | conftest._INTERPRETED_FILES:
        assert (HERE / name).is_file(), name
    for file_name, tests in conftest._SLOW_TESTS.items():
        src = (HERE / file_name).read_text()
        defined = set(re.findall(r"^def (test_\w+)\(", src, flags=re.M))
        assert tests <= defined, f"{file_name}: not defined: {sorted(tests - defined)}"
    fixtures = "".join(p.read_text() for p in HERE.glob("*.py"))
    for fixture in conftest._SLOW_FIXTURES:
        assert re.search(rf"^def {fixture}\(", fixtures, flags=re.M), fixture
