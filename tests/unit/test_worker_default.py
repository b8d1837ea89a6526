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


@pytest.mark.parametrize("total,workers,share", [
    (256 << 20, 0, 256 << 20),   # no workers: the whole budget
    (256 << 20, 2, (256 << 20) // 3),
    (256 << 20, 8, 64 << 20),    # never below twice the largest request
    (1 << 30, 3, 256 << 20),
])
def test_the_buffer_budget_is_split_between_owner_and_workers(total, workers, share):
    from nbdbackup.nbd.server import Server, budget_share

    assert budget_share(total, workers) == share
    s = Server(max_buffer_memory=total, workers=workers)
    assert s.budget.limit == share  # what the owner keeps and each worker is sent
