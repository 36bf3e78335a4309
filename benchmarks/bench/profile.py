"""``--profile``: one more triochat saturation run under py-spy, and its top functions."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from .processes import Server, ServerSpec, pinned, run_loadgen, start
from .results import Params
from .runs import Bench
from .scenarios import SCENARIOS

__all__ = ["print_top", "profile_saturation"]


def profile_saturation(bench: Bench, spec: ServerSpec, sizes: Params, out_dir: Path) -> None:
    """An extra triochat saturation run (``sizes``, a window of 10 s at least)
    under py-spy: raw stacks and a flame graph in ``out_dir``; prints the top
    functions."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("--profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    saturation = SCENARIOS["saturation"]
    params = dict(sizes)
    params["durationS"] = max(params["durationS"], 10)
    server = Server(spec, bench.server_cpu, bench.workdir)
    try:
        server.wait_ready()
        raw = out_dir / "triochat-saturation.txt"
        svg = out_dir / "triochat-saturation.svg"
        record = [pyspy, "record", "--pid", str(server.pid), "--rate", "100", "--nonblocking"]
        record += ["--duration", str(int(params["warmupS"] + params["durationS"]))]
        spies = [
            start(
                pinned([*record, "--format", fmt, "-o", str(path)], bench.loadgen_cpu),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for fmt, path in (("raw", raw), ("flamegraph", svg))
        ]
        run_loadgen(saturation.load(params), [server], bench.loadgen_cpu, bench.verbose)
        for spy in spies:
            spy.wait(timeout=60)
    finally:
        server.stop()
    print(f"\npy-spy profile of triochat in saturation: {raw}, {svg}")
    print_top(raw)


def print_top(raw: Path, top: int = 10) -> None:
    """The ``top`` functions of py-spy's raw stacks, by own and by total time."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        print("(no samples)")
        return
    print(f"top {top} by own time ({samples} samples):")
    for frame, count in own.most_common(top):
        print(f"  {100 * count / samples:5.1f}%  {frame}")
    print(f"top {top} by total time (callees included; entry points left out):")
    entry = re.compile(r"<frozen runpy>|triochat/(cli|__main__)\.py|^(run|unrolled_run) \(trio/")
    ranked = [(f, c) for f, c in total.most_common() if not entry.search(f)]
    for frame, count in ranked[:top]:
        print(f"  {100 * count / samples:5.1f}%  {frame}")
