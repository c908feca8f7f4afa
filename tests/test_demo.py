"""The demo's summary: its targets, and a wall time that is judged only for a demo run whole."""
from collections import Counter
from pathlib import Path

from t2i.demo import _checks, _print_checks, _print_summary
from t2i.eval.report import Check

SUMMARY = {"all": {"colour": 0.96, "correct": 0.7}, "seen": {"correct": 0.9}, "held_out": {"correct": 0.52}}


def summary_lines(capsys, resumed: bool) -> list[str]:
    _print_summary(SUMMARY, Counter(seen=96, held_out=48, two_object=48), _checks(SUMMARY, {"total": 8.83}, resumed),
                   Path("grid.png"), Path("report.html"), Path("pipeline"), resumed)
    return [line.strip() for line in capsys.readouterr().out.splitlines()]


def test_the_wall_time_of_a_resumed_demo_is_not_judged(capsys):
    assert "wall time, s                8.83  target ≤ 240  met" in summary_lines(capsys, resumed=False)
    lines = summary_lines(capsys, resumed=True)
    assert "wall time, s                8.83  (not judged: this run resumed one begun earlier)" in lines
    assert "seen fully correct          0.90  target ≥ 0.6  met" in lines


def test_a_derived_target_is_printed_to_two_places_as_the_values_are(capsys):
    _print_checks([Check("fully correct at 64 px", 0.68, 0.697917 - 0.05, True)], resumed=True)
    assert capsys.readouterr().out.strip() == "fully correct at 64 px      0.68  target ≥ 0.65  met"
