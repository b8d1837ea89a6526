"""Fault injection for worker processes (tests only; docs/hunt.md).

Put this directory first on ``PYTHONPATH`` of a process (a worker started by
an in-process `Server`, which copies ``os.environ``) and set
``NBDBACKUP_TEST_SLOW_WRITE=LENGTH:SECONDS:DIR``: every
`FileDev._pwritev_all` of exactly ``LENGTH`` bytes (a write above
``inline_limit``: it runs in the thread pool, so the loop goes on) creates
``DIR/started``, sleeps ``SECONDS``, writes, then creates ``DIR/done``.  That
holds one write in flight, on purpose, while the test acts (a client
disconnect, a bitmap change in the server process).  Without the variable
nothing is changed.
"""

import os

_spec = os.environ.get("NBDBACKUP_TEST_SLOW_WRITE")
if _spec:
    import time

    from nbdbackup.blockdev.file import FileDev

    _length, _seconds, _dir = _spec.split(":", 2)
    _orig = FileDev._pwritev_all

    def _slow(self, buf, offset, flags):
        if len(buf) != int(_length):
            return _orig(self, buf, offset, flags)
        open(os.path.join(_dir, "started"), "w").close()
        time.sleep(float(_seconds))
        _orig(self, buf, offset, flags)
        open(os.path.join(_dir, "done"), "w").close()

    FileDev._pwritev_all = _slow
