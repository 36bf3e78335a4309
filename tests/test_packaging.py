"""What a user installs: the wheel and the sdist carry the whole server (#11).

The README's run command installs non-editable (``pip install .``), so a
module missing from the wheel only shows there; the editable install the
tests run from would hide it. `.ci/run` also runs that command verbatim and
smoke-tests the server it starts (``.ci/smoke.py``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import trio

import triochat
from triochat.server import redact_url

from .conftest import running_server

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PAGE = ROOT / "static"


def _shipped_files() -> list[str]:
    """Every file the server needs, as ``triochat/...`` paths: modules and the page."""
    modules = [
        path.relative_to(SRC).as_posix()
        for path in sorted((SRC / "triochat").rglob("*.py"))
        if "__pycache__" not in path.parts
    ]
    page = [f"triochat/static/{path.name}" for path in sorted(PAGE.iterdir()) if path.is_file()]
    assert "triochat/backplane/redis.py" in modules  # the walk sees subpackages
    assert "triochat/static/index.html" in page
    return [*modules, "triochat/py.typed", *page]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist, and the wheel built from that sdist, as ``python -m build`` makes them."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (sdist,) = out.glob("triochat-*.tar.gz")
    (wheel,) = out.glob("triochat-*.whl")
    return sdist, wheel


def test_packaging_wheel_holds_every_module_and_the_page(built):
    """The wheel holds every module under src/triochat and every file of the page."""
    names = set(zipfile.ZipFile(built[1]).namelist())
    missing = [name for name in _shipped_files() if name not in names]
    assert not missing, f"not in the wheel: {missing}"


def test_packaging_sdist_holds_every_module_and_the_page(built):
    """The sdist (what PyPI users build from) holds every module and the page."""
    with tarfile.open(built[0]) as sdist:
        names = {name.partition("/")[2] for name in sdist.getnames()}
    missing = [name for name in _shipped_files() if f"src/{name}" not in names]
    assert not missing, f"not in the sdist: {missing}"


def test_packaging_version_is_the_installed_one():
    """``triochat --version`` prints the version the installed metadata carries."""
    result = subprocess.run(
        [sys.executable, "-m", "triochat", "--version"], capture_output=True, text=True, check=True
    )
    installed = importlib.metadata.version("triochat")
    assert result.stdout.strip() == f"triochat {installed}"
    assert installed == triochat.__version__


async def test_packaging_startup_line_says_version_url_storage_redis_tls(caplog):
    """The start-up log line: version, URL, storage, Redis and TLS (#11)."""
    caplog.set_level(logging.INFO, logger="triochat.server")
    with trio.fail_after(10):
        async with running_server() as server:
            port = server.port
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("triochat ")]
    assert lines == [
        f"triochat {triochat.__version__} on http://127.0.0.1:{port}; "
        "storage: memory (lost on restart); redis: off; tls: off"
    ]


async def test_packaging_startup_line_names_the_sqlite_file(tmp_path, caplog):
    """With SQLite storage the line names the database file."""
    caplog.set_level(logging.INFO, logger="triochat.server")
    with trio.fail_after(10):
        async with running_server(memory=False, data_dir=tmp_path):
            pass
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("triochat ")]
    assert f"storage: sqlite {tmp_path / 'history.sqlite3'};" in line


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@redis.example:6379/1", "redis://:***@redis.example:6379/1"),
        ("rediss://chat:s3cret@redis.example/2", "rediss://chat:***@redis.example/2"),
    ],
)
def test_packaging_redis_url_is_shown_without_its_password(url, shown):
    """A Redis URL in the log never carries its password."""
    assert redact_url(url) == shown
