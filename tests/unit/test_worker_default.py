"""`nbd.worker.default_workers`: the ``serve --workers`` default (no I/O)."""

from __future__ import annotations

import os

import pytest

from nbdbackup.nbd import worker


def test_env_wins_and_must_be_a_number(monkeypatch):
    monkeypatch.setenv(worker.ENV, "3")
    assert worker.default_workers() == 3
    monkeypatch.setenv(worker.ENV, "0")
    assert worker.default_workers() == 0
    monkeypatch.setenv(worker.ENV, "many")
    with pytest.raises(ValueError, match="not a number"):
        worker.default_workers()


@pytest.mark.parametrize("cpus,want", [(1, 0), (2, 2), (4, 4), (64, worker.DEFAULT_MAX)])
def test_one_per_usable_cpu_from_two_on(monkeypatch, cpus, want):
    monkeypatch.delenv(worker.ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    assert worker.default_workers() == want
