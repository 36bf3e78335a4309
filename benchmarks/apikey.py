"""Does the server API's key check take longer for a better guess? (docs/protocol.md §16)

    python benchmarks/apikey.py [--rounds 41] [--calls 20000] [--key-chars 4096]

`triochat.api` compares SHA-256 digests of the given and the configured
key with `hmac.compare_digest`, so the time of a check should not depend
on how much of the key a guess got right, nor on the guess's length. This
times the check for guesses that share nothing, half, or all but the last
character with the key, one character longer, and the key itself, in
interleaved rounds (median of the per-round means, so drift hits every
guess alike), and prints each guess's time as a ratio to the wrong guess
that shares nothing.

The peer in the same run is a plain ``==`` on the strings, the check a
careless server writes: it stops at the first differing character, so its
ratios grow with the shared prefix. A long key (``--key-chars``) makes that
visible above the noise, which shows the harness can see a leak when there
is one. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from triochat.api import _authorized


def naive_check(header: str | None, key: str) -> bool:
    """The careless peer: string equality, which stops at the first difference."""
    return header == "Bearer " + key


def guesses(key: str) -> dict[str, str]:
    half = len(key) // 2
    return {
        "nothing shared": "x" * len(key),
        "half shared": key[:half] + "x" * (len(key) - half),
        "all but last": key[:-1] + "x",
        "one longer": key + "x",
        "the key": key,
    }


def time_checks(
    check: Callable[[str | None, str], bool], key: str, rounds: int, calls: int
) -> dict[str, float]:
    """Median over ``rounds`` of the mean ns per call, for each guess."""
    headers = {name: "Bearer " + guess for name, guess in guesses(key).items()}
    samples: dict[str, list[float]] = {name: [] for name in headers}
    for round_no in range(rounds):
        # A different order each round: no guess always runs warm or cold.
        names = list(headers)
        names = names[round_no % len(names) :] + names[: round_no % len(names)]
        for name in names:
            header = headers[name]
            started = time.perf_counter_ns()
            for _ in range(calls):
                check(header, key)
            samples[name].append((time.perf_counter_ns() - started) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--key-chars", type=int, default=4096)
    args = parser.parse_args()
    key = "k" * args.key_chars
    if not _authorized("Bearer " + key, key) or _authorized("Bearer x", key):
        raise SystemExit("the key check does not work as the benchmark assumes")
    results = {
        "triochat (sha256 + compare_digest)": time_checks(
            _authorized, key, args.rounds, args.calls
        ),
        "peer (plain ==)": time_checks(naive_check, key, args.rounds, args.calls),
    }
    print(f"key of {args.key_chars} characters, {args.rounds} rounds of {args.calls} calls")
    for label, times in results.items():
        base = times["nothing shared"]
        print(f"\n{label}")
        print(f"  {'guess':<16} {'ns/check':>10} {'ratio':>7}")
        for name, ns in times.items():
            print(f"  {name:<16} {ns:>10.1f} {ns / base:>7.2f}")


if __name__ == "__main__":
    main()
