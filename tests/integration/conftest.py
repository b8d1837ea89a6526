"""Integration tests: nbdbackup's own client against its own server.

Shares the peer helpers of tests/interop (``peers``) so integration tests can
run ``nbdbackup serve`` as a subprocess the same way; everything collected
here is marked ``integration``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_INTEROP = str(Path(__file__).resolve().parent.parent / "interop")
if _INTEROP not in sys.path:
    sys.path.append(_INTEROP)


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: our client against our server")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def serve():
    import peers

    return peers.nbdbackup_serve
