"""The benchmark runner behind ``benchmarks/run.py``, by concern.

Dependencies point one way: ``results`` <- ``processes`` <- ``servers``,
``machine``, ``runs``; ``results`` <- ``report``; all of them <- ``scenarios/``
<- ``profile`` <- run.py.

- ``results``: what a result is; reading numbers out of it (NaN, None), medians.
- ``processes``: child processes (each its own group, all killed at the end),
  a server on a free port and its bounded stop, the load generator, RSS,
  CPU pinning, the wait for a quiet machine.
- ``servers``: the command lines of triochat, the peer, the floor, redis-server.
- ``machine``: Node, the file limit, the header's versions, src/'s fingerprint.
- ``runs``: what every run needs (`Bench`); one run of a fresh server; the
  usual runner (each server once).
- ``report``: rows as data (`Row`, `TextRow`, `Verdict`), the main table,
  side-by-side tables, notes, Markdown.
- ``scenarios/``: one module per scenario (sizes, watchdog, runner, rows,
  tables of its own) and the registry, `SCENARIOS`.
- ``profile``: ``--profile`` (py-spy).
"""
