"""`nbdbackup.logqueue`: a log call never blocks; what a full queue refuses is counted
and reported before the next record written, in order."""

from __future__ import annotations

import io
import logging
import queue
import threading

from nbdbackup import logqueue


def test_a_full_queue_drops_counts_and_reports_in_order():
    q: queue.Queue = queue.Queue(2)
    source = logqueue._DroppingQueueHandler(q)
    out_text = io.StringIO()
    out = logging.StreamHandler(out_text)
    out.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test.logqueue")
    log.propagate = False
    log.addHandler(source)
    log.setLevel(logging.INFO)
    try:
        for i in range(5):  # no writer yet: the output is "stuck"; none of these calls blocks
            log.info("record %d", i)
        assert source.dropped == 3 and q.qsize() == 2
        writer = threading.Thread(target=logqueue._write, args=(q, source, out), daemon=True)
        writer.start()
        q.join()
        log.info("record %d", 5)  # after the refusals: the count comes first
        q.join()
        q.put(None)
        writer.join(5)
    finally:
        log.removeHandler(source)
    lines = out_text.getvalue().splitlines()
    assert lines[:2] == ["INFO record 0", "INFO record 1"]
    assert lines[2] == "WARNING 3 log record(s) dropped: the log's reader was not keeping up"
    assert lines[3:] == ["INFO record 5"] and source.dropped == 0
