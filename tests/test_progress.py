"""Progress as a person sees it: a bar on a terminal, a line every few seconds in a log."""

import logging

from spamray.progress import Progress, format_duration


def test_a_log_gets_a_line_every_few_seconds_with_rate_and_time_left(caplog, monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 2.0, 12.0, 12.0, 30.0, 30.0, 30.0])
    monkeypatch.setattr("spamray.progress.time.monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="spamray.test"):
        progress = Progress("scoring", 1000, "rows", logging.getLogger("spamray.test"), interactive=False)
        progress.update(100)  # the first update starts the clock: t=1
        progress.update(300, loss=0.25)  # t=2: too soon for a line
        progress.update(600)  # t=12: a line
        progress.close()  # a last line
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "scoring: 600 of 1,000 rows (60%), 45 rows/s, 8 s left"
    assert lines[-1].startswith("scoring: 600 of 1,000 rows (60%)") and len(lines) == 2


def test_durations_read_as_a_person_would_say_them():
    assert [format_duration(s) for s in (9, 75, 7322)] == ["9 s", "1 min 15 s", "2 h 02 min"]
