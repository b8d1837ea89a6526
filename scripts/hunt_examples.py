"""pytest plugin for bug hunts (docs/hunt.md): multiply every hypothesis
test's ``max_examples`` (their settings are fixed in the test files).

    NBDBACKUP_HUNT_FACTOR=20 .venv/bin/python -m pytest -p scripts.hunt_examples \
        --hypothesis-seed=1 tests/unit/test_live_delegation.py

Not for CI: campaigns take minutes to hours.
"""

import os

from hypothesis import settings

FACTOR = int(os.environ.get("NBDBACKUP_HUNT_FACTOR", "10"))


def _more(s: settings) -> settings:
    return settings(s, max_examples=s.max_examples * FACTOR, deadline=None)


def pytest_collection_modifyitems(session, config, items):
    seen = set()
    for item in items:
        fn = getattr(item, "obj", None)
        inner = getattr(fn, "hypothesis", None)
        s = getattr(fn, "_hypothesis_internal_use_settings", None)
        if inner is not None and s is not None and id(fn) not in seen:
            seen.add(id(fn))
            fn._hypothesis_internal_use_settings = _more(s)
        cls = getattr(item, "cls", None)
        if cls is not None and isinstance(getattr(cls, "settings", None), settings) and id(cls) not in seen:
            seen.add(id(cls))
            cls.settings = _more(cls.settings)
