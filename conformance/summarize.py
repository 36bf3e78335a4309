"""Summarise an Autobahn|Testsuite report; exit 1 unless every case is OK or INFORMATIONAL.

Reads ``reports/servers/index.json`` (written by ``wstest -m
fuzzingclient``) and prints, per case group, how many cases ended OK,
NON-STRICT, INFORMATIONAL, UNIMPLEMENTED or FAILED, then every case that is
not OK with its close behaviour, then the totals. ``--markdown`` prints the
table as Markdown (as in docs/reliability.md).

The bar (issue #13): 0 FAILED, 0 NON-STRICT and 0 UNIMPLEMENTED. The echo
runs with compression on, so groups 12-13 falling back to UNIMPLEMENTED means
permessage-deflate silently stopped being negotiated. INFORMATIONAL cases
(the suite records any outcome) are allowed.

Usage: ``python conformance/summarize.py [--markdown] [--part PART] INDEX.json [INDEX.json ...]``
(several: the shards of one run, merged). With ``--part`` (what
`conformance/run.sh` ran: ``all``, ``fast`` or ``slow``) the report must
also hold a case of every group of that part and of no other (`PARTS`), so a
shard that ran nothing, or a group that fell between the parts, fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Final

__all__ = ["GROUPS", "PARTS", "main", "summarize"]

#: The suite's top-level case groups, as its report names them.
GROUPS: Final = {
    "1": "Framing",
    "2": "Pings/Pongs",
    "3": "Reserved Bits",
    "4": "Opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 Handling",
    "7": "Close Handling",
    "9": "Limits/Performance",
    "10": "Misc",
    "12": "WebSocket Compression (different payloads)",
    "13": "WebSocket Compression (different parameters)",
}
#: The groups each part of `conformance/run.sh` runs: "slow" is the
#: permessage-deflate groups, "fast" the rest.
SLOW_GROUPS: Final = frozenset({"12", "13"})
PARTS: Final = {
    "all": frozenset(GROUPS),
    "fast": frozenset(GROUPS) - SLOW_GROUPS,
    "slow": SLOW_GROUPS,
}
#: Columns of the table; any other behaviour the suite reports counts as FAILED.
BEHAVIORS: Final = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")
#: How a case's close behaviour affects its result, as the suite's report colours it:
#: green leaves the result alone, yellow makes an OK case NON-STRICT, red fails it.
CLOSE_FINE: Final = frozenset({"OK", "INFORMATIONAL", "UNIMPLEMENTED"})
CLOSE_NON_STRICT: Final = frozenset({"WRONG CODE", "FAILED BY CLIENT"})
#: Results that fail the run; only OK and INFORMATIONAL pass.
FAILING: Final = ("FAILED", "NON-STRICT", "UNIMPLEMENTED")

Case = dict[str, object]


def _case_key(case_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case_id.split(".") if part.isdigit())


def _behavior(case: Case) -> str:
    """The case's result, made worse by a close behaviour the report does not colour green.

    Unknown behaviours (the suite's ``NO_CLOSE`` among them) count as FAILED.
    """
    behavior = str(case.get("behavior", "FAILED"))
    close = str(case.get("behaviorClose", "FAILED"))
    if behavior not in BEHAVIORS:
        return "FAILED"
    if behavior in ("OK", "NON-STRICT") and close not in CLOSE_FINE:
        return "NON-STRICT" if close in CLOSE_NON_STRICT else "FAILED"
    return behavior


def summarize(cases: dict[str, Case]) -> tuple[dict[str, Counter[str]], list[str]]:
    """Counts per group, and one line per case that is not OK."""
    table: dict[str, Counter[str]] = {}
    notable: list[str] = []
    for case_id in sorted(cases, key=_case_key):
        case = cases[case_id]
        behavior = _behavior(case)
        table.setdefault(case_id.split(".")[0], Counter())[behavior] += 1
        if behavior != "OK":
            notable.append(
                f"{case_id}: {behavior} (behavior {case.get('behavior')}, "
                f"close {case.get('behaviorClose')}, code {case.get('remoteCloseCode')})"
            )
    return table, notable


def _render(table: dict[str, Counter[str]], *, markdown: bool) -> str:
    header = ["group", *BEHAVIORS]
    rows = []
    total: Counter[str] = Counter()
    for group in sorted(table, key=int):
        counts = table[group]
        total.update(counts)
        name = f"{group} {GROUPS.get(group, '')}".strip()
        rows.append([name, *(str(counts[b]) for b in BEHAVIORS)])
    rows.append(["total", *(str(total[b]) for b in BEHAVIORS)])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "index", type=Path, nargs="+", help="reports/servers/index.json, one per shard"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--part", choices=sorted(PARTS), help="the part run.sh ran: its groups must all be there"
    )
    args = parser.parse_args(argv)
    # Shards of one run (conformance/run.sh) each write a report: their cases
    # are merged by agent, as if one wstest had run them all.
    report: dict[str, dict[str, Case]] = {}
    for index in args.index:
        try:
            shard = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            print(f"conformance: no readable report at {index}: {exc}", file=sys.stderr)
            return 1
        if not isinstance(shard, dict) or not shard:
            print(f"conformance: empty report at {index}", file=sys.stderr)
            return 1
        for agent, cases in shard.items():
            if not isinstance(cases, dict) or not cases:
                print(f"conformance: no cases for {agent} in {index}", file=sys.stderr)
                return 1
            report.setdefault(agent, {}).update(cases)
    total: Counter[str] = Counter()
    wrong_groups: list[str] = []
    for agent, cases in sorted(report.items()):
        table, notable = summarize(cases)
        if args.part is not None and set(table) != PARTS[args.part]:
            missing = sorted(PARTS[args.part] - set(table), key=int)
            extra = sorted(set(table) - PARTS[args.part], key=int)
            wrong_groups.append(
                f"{agent}: part {args.part} has groups missing {missing}, unexpected {extra}"
            )
        print(f"Autobahn|Testsuite, agent {agent}: {len(cases)} cases\n")
        print(_render(table, markdown=args.markdown))
        if notable:
            print("\nnot OK:")
            print("\n".join("  " + line for line in notable))
        for counts in table.values():
            total.update(counts)
    counts_line = ", ".join(f"{total[b]} {b}" for b in BEHAVIORS)
    bad = [f"{total[b]} {b}" for b in FAILING if total[b]]
    print(f"\nconformance: {counts_line}")
    if bad:
        print(f"conformance: not at the bar: {', '.join(bad)}", file=sys.stderr)
        return 1
    if wrong_groups:
        print(f"conformance: {'; '.join(wrong_groups)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
