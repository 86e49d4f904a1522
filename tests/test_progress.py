"""Progress reporting: a logged line per interval and a summary line when stderr is not a terminal."""

from __future__ import annotations

import logging

from slaconv.progress import progress


def test_lines_per_interval_and_a_summary(caplog):
    caplog.set_level(logging.INFO, logger="slaconv.progress")
    bar = progress(range(2, 5), desc="stage 9", initial=2, total=4 + 1, interval=0.0)
    seen = []
    for step in bar:
        seen.append(step)
        bar.set_postfix(loss=f"{step / 10:.2f}")
    assert seen == [2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:3] == ["stage 9: 3/5 (loss=0.20)", "stage 9: 4/5 (loss=0.30)", "stage 9: 5/5 (loss=0.40)"]
    assert len(lines) == 4 and lines[3].startswith("stage 9: 5/5 (loss=0.40), ") and lines[3].endswith(" s")


def test_disabled_progress_logs_nothing(caplog):
    caplog.set_level(logging.DEBUG, logger="slaconv.progress")
    assert list(progress(iter("abc"), desc="x", enabled=False, interval=0.0)) == ["a", "b", "c"]
    assert caplog.records == []


def test_unknown_length_and_long_interval(caplog):
    caplog.set_level(logging.INFO, logger="slaconv.progress")
    assert sum(progress((i for i in range(4)), desc="items")) == 6
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["items: 4"]
