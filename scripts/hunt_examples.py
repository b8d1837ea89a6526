"""pytest plugin that scales every hypothesis test's ``max_examples`` (their
settings are fixed in the test files) by ``NBDBACKUP_HUNT_FACTOR``.

Bug hunts (docs/hunt.md) multiply them; campaigns take minutes to hours:

    NBDBACKUP_HUNT_FACTOR=20 .venv/bin/python -m pytest -p scripts.hunt_examples \
        --hypothesis-seed=1 tests/unit/test_live_delegation.py

The fresh-machine check (tests/containers/test_fresh_debian.py) divides them:
inside its clean Debian container the suite proves that a stock machine can
run every test, while the search for counter-examples is the host run's job
(same CI, full examples); a fraction keeps every test and rule exercised
(at least one example each).
"""

import os

from hypothesis import settings

FACTOR = float(os.environ.get("NBDBACKUP_HUNT_FACTOR", "10"))
assert FACTOR > 0, "NBDBACKUP_HUNT_FACTOR must be > 0"


def _more(s: settings) -> settings:
    return settings(s, max_examples=max(1, round(s.max_examples * FACTOR)), deadline=None)


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
