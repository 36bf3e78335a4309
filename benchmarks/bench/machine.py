"""The machine and the tools: what the header says, and what a run needs.

Node.js 18+ for the load generator, the file limit raised for 10,000
connections, the versions of everything measured, and a fingerprint of
triochat's source to notice an edit in the middle of a run.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Final

from .processes import REPO

__all__ = [
    "ensure_node",
    "machine_info",
    "raise_file_limit",
    "redis_version",
    "source_fingerprint",
]

NOFILE: Final = 65536


def source_fingerprint() -> str:
    """Changes whenever a file under src/ changes (the server under test)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "src").rglob("*")):
        if path.is_file() and "egg-info" not in str(path):
            digest.update(path.read_bytes())
    return digest.hexdigest()


def raise_file_limit() -> int:
    """Raise RLIMIT_NOFILE as far as allowed; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(NOFILE, hard), hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
    return soft


def ensure_node() -> str:
    """The version of Node.js on PATH (18 or newer), or exit."""
    node = shutil.which("node")
    if not node:
        sys.exit("benchmarks need Node.js 18+ (node) for the load generator")
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.match(r"v(\d+)", out.strip())
    if not match or int(match.group(1)) < 18:
        sys.exit(f"benchmarks need Node.js 18+, found {out.strip()!r}")
    return out.strip()


def redis_version(redis_server: str) -> str:
    path = shutil.which(redis_server)
    if not path:
        return "not found"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


def _version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    """HEAD's short hash, noting uncommitted changes in src/ ("?" without git)."""
    git = shutil.which("git")
    if not git:
        return "?"
    head = subprocess.run(
        [git, "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    dirty = subprocess.run(
        [git, "-C", str(REPO), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    commit = head.stdout.strip() or "?"
    if dirty.stdout.strip():
        commit += " + uncommitted changes in src/"
    return commit


def machine_info(node_version: str) -> list[str]:
    """The header's first lines: date, machine, versions, source, load generator."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    libs = ", ".join(
        f"{name} {_version_of(name)}"
        for name in ("triochat", "trio", "trio-websocket", "wsproto", "msgspec", "websockets")
    )
    return [
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"machine: {os.cpu_count()} CPUs ({cpu_model}), {platform.system()} "
        f"{platform.release()}, {platform.freedesktop_os_release().get('PRETTY_NAME', '?')}",
        f"python {platform.python_version()}: {libs}",
        f"triochat source: git {_git_commit()}",
        f"load generator: node {node_version}, benchmarks/rawws.mjs client",
    ]
