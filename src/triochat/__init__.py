"""triochat: a real-time chat server for the browser, on Trio."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from .config import Config as Config
from .errors import ClientProtocolError as ClientProtocolError
from .errors import ConfigError as ConfigError
from .errors import StorageError as StorageError
from .errors import TriochatError as TriochatError
from .hooks import Identity as Identity
from .hooks import Refusal as Refusal
from .hooks import SayInfo as SayInfo

if TYPE_CHECKING:
    from .server import Server as Server
    from .server import serve as serve


def __getattr__(name: str) -> Any:
    # Lazy: `import triochat.protocol` must not import trio (the sans-I/O rule).
    if name in ("Server", "serve"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module 'triochat' has no attribute {name!r}")


__all__ = [
    "ClientProtocolError",
    "Config",
    "ConfigError",
    "Identity",
    "Refusal",
    "SayInfo",
    "Server",
    "StorageError",
    "TriochatError",
    "__version__",
    "serve",
]
