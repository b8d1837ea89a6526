"""`nbdbackup.cli`: the garbage collector after a command-line start-up (`_collect_for`)."""

from __future__ import annotations

import argparse
import gc

import pytest

from nbdbackup.cli import _collect_for


@pytest.fixture
def gc_state():
    before, enabled = gc.get_threshold(), gc.isenabled()
    yield
    gc.set_threshold(*before)
    (gc.enable if enabled else gc.disable)()


def test_a_quick_exit_command_gets_a_large_first_generation(gc_state) -> None:
    gc.disable()
    gc.set_threshold(700, 10, 10)
    _collect_for(argparse.Namespace(quick_exit=True))
    assert gc.isenabled() and gc.get_threshold() == (20_000, 20, 20)


def test_other_commands_keep_the_defaults(gc_state) -> None:
    gc.disable()
    gc.set_threshold(700, 10, 10)
    _collect_for(argparse.Namespace(command="serve"))
    assert gc.isenabled() and gc.get_threshold() == (700, 10, 10)
