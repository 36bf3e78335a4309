"""`conformance/summarize.py` holds CI to the Autobahn bar of issue #13.

The bar: 0 FAILED, 0 NON-STRICT, 0 UNIMPLEMENTED (the echo runs with
compression on, so groups 12-13 must be implemented); INFORMATIONAL is
allowed. Each test writes a small report of the shape ``wstest -m
fuzzingclient`` writes (``reports/servers/index.json``: agent, then case id,
then the case's results) and runs the script as `conformance/run.sh` does,
checking its exit status and the counts it prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "conformance" / "summarize.py"
AGENT = "triochat-echo"


def case(behavior: str, close: str = "OK", code: int | None = 1000) -> dict[str, Any]:
    """One case's entry, with the fields the suite writes for every case."""
    return {
        "behavior": behavior,
        "behaviorClose": close,
        "duration": 3,
        "remoteCloseCode": code,
        "reportfile": "triochat_echo_case.json",
    }


#: A passing run in miniature: OK cases in groups 1-13 and the INFORMATIONAL 7.13.1.
GOOD: dict[str, dict[str, Any]] = {
    "1.1.1": case("OK"),
    "3.2": case("OK", code=1002),
    "6.4.1": case("OK", code=1007),
    "7.13.1": case("INFORMATIONAL", "INFORMATIONAL", 1002),
    "12.1.1": case("OK"),
    "13.1.1": case("OK"),
}


def run_summary(tmp_path: Path, report: object) -> subprocess.CompletedProcess[str]:
    """Write ``report`` where wstest puts it, then run summarize.py on it."""
    index = tmp_path / "reports" / "servers" / "index.json"
    index.parent.mkdir(parents=True)
    index.write_text(json.dumps(report))
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(index)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def counts_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("conformance: ")]
    assert lines, f"no counts line in:\n{stdout}"
    return lines[-1]


def test_conformance_summary_ok_and_informational_pass(tmp_path):
    """Only OK and INFORMATIONAL cases: exit 0, and the counts are printed."""
    done = run_summary(tmp_path, {AGENT: GOOD})
    assert done.returncode == 0, done.stdout + done.stderr
    assert counts_line(done.stdout) == (
        "conformance: 5 OK, 0 NON-STRICT, 1 INFORMATIONAL, 0 UNIMPLEMENTED, 0 FAILED"
    )
    assert "7.13.1: INFORMATIONAL" in done.stdout


@pytest.mark.parametrize(
    ("case_id", "entry", "result"),
    [
        pytest.param("5.15", case("NON-STRICT"), "NON-STRICT", id="non-strict"),
        # an OK case whose close behaviour the report colours yellow is NON-STRICT
        pytest.param("3.3", case("OK", "WRONG CODE", 1000), "NON-STRICT", id="close-wrong-code"),
        # compression silently off: the suite records group 12-13 cases so
        pytest.param("12.2.3", case("UNIMPLEMENTED", "OK"), "UNIMPLEMENTED", id="unimplemented"),
        pytest.param("13.7.18", case("UNIMPLEMENTED", "OK"), "UNIMPLEMENTED", id="unimpl-13"),
        pytest.param("4.1.3", case("FAILED", "OK"), "FAILED", id="failed"),
        # red close behaviours fail an OK case
        pytest.param("7.1.1", case("OK", "UNCLEAN", None), "FAILED", id="close-unclean"),
        pytest.param("7.1.2", case("OK", "NO_CLOSE", None), "FAILED", id="close-unknown"),
    ],
)
def test_conformance_summary_fails_below_the_bar(tmp_path, case_id, entry, result):
    """One NON-STRICT, UNIMPLEMENTED or FAILED case among good ones: exit 1, counted and named."""
    done = run_summary(tmp_path, {AGENT: {**GOOD, case_id: entry}})
    assert done.returncode == 1, done.stdout + done.stderr
    counts = {"OK": 5, "NON-STRICT": 0, "INFORMATIONAL": 1, "UNIMPLEMENTED": 0, "FAILED": 0}
    counts[result] += 1
    want = ", ".join(f"{n} {name}" for name, n in counts.items())
    assert counts_line(done.stdout) == f"conformance: {want}"
    assert f"{case_id}: {result}" in done.stdout
    assert f"1 {result}" in done.stderr


def test_conformance_summary_counts_every_failing_kind(tmp_path):
    """Several kinds below the bar at once are all reported."""
    report = {
        **GOOD,
        "5.15": case("NON-STRICT"),
        "12.1.2": case("UNIMPLEMENTED"),
        "12.1.3": case("UNIMPLEMENTED"),
        "9.1.1": case("FAILED"),
    }
    done = run_summary(tmp_path, {AGENT: report})
    assert done.returncode == 1
    assert "1 FAILED, 1 NON-STRICT, 2 UNIMPLEMENTED" in done.stderr


@pytest.mark.parametrize(
    "report",
    [
        pytest.param({}, id="no-agent"),
        pytest.param({AGENT: {}}, id="no-cases"),
        pytest.param([], id="not-an-object"),
    ],
)
def test_conformance_summary_empty_report_fails(tmp_path, report):
    """A report with nothing in it is a failed run, not a pass."""
    done = run_summary(tmp_path, report)
    assert done.returncode == 1, done.stdout + done.stderr


def test_conformance_summary_missing_report_fails(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "index.json")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "no readable report" in done.stderr


def _shard(tmp_path: Path, n: int, report: object) -> Path:
    index = tmp_path / f"reports{n}" / "servers" / "index.json"
    index.parent.mkdir(parents=True)
    index.write_text(json.dumps(report))
    return index


@pytest.mark.parametrize("bad_shard", [None, 1, 2])
def test_conformance_summary_merges_the_shards_of_one_run(tmp_path, bad_shard):
    """conformance/run.sh runs two shards side by side: their cases are counted as
    one report, and a failure in either shard fails the run."""
    first = {k: v for k, v in GOOD.items() if not k.startswith("13.")}
    second = {"13.1.1": case("OK"), "13.2.1": case("OK")}
    if bad_shard == 1:
        first = {**first, "5.1": case("FAILED")}
    elif bad_shard == 2:
        second = {**second, "13.3.1": case("UNIMPLEMENTED")}
    paths = [_shard(tmp_path, 1, {AGENT: first}), _shard(tmp_path, 2, {AGENT: second})]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    cases = len(first) + len(second)
    assert f"{cases} cases" in done.stdout
    assert done.returncode == (0 if bad_shard is None else 1), done.stdout + done.stderr


def _all_groups() -> dict[str, dict[str, Any]]:
    """One OK case in every group of the suite."""
    return {
        f"{group}.1.1": case("OK")
        for group in ("1", "2", "3", "4", "5", "6", "7", "9", "10", "12", "13")
    }


@pytest.mark.parametrize(
    ("part", "drop", "passes"),
    [
        ("all", None, True),
        ("all", "9", False),  # a group that fell between the shards
        ("fast", "13", False),  # a deflate group (12) where only the rest belongs
        ("slow", None, False),  # "slow" is 12 and 13 alone
        ("fast", None, False),
    ],
)
def test_conformance_summary_part_must_hold_exactly_its_groups(tmp_path, part, drop, passes):
    """conformance/run.sh runs its parts (fast: groups 1-10; slow: 12 and 13) apart,
    in CI one beside the tests: with --part, a report missing a group of its
    part, or holding one of the other part, fails, though every case is OK."""
    cases = _all_groups()
    if drop is not None:
        cases = {k: v for k, v in cases.items() if not k.startswith(f"{drop}.")}
    index = _shard(tmp_path, 1, {AGENT: cases})
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--part", part, str(index)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == (0 if passes else 1), done.stdout + done.stderr
    if not passes:
        assert f"part {part} has groups missing" in done.stderr


def test_conformance_summary_parts_cover_every_group_once():
    """fast and slow together are every group, and share none."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import summarize
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert summarize.PARTS["fast"] | summarize.PARTS["slow"] == set(summarize.GROUPS)
    assert not summarize.PARTS["fast"] & summarize.PARTS["slow"]
    assert summarize.PARTS["all"] == set(summarize.GROUPS)
