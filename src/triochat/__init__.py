"""triochat: a real-time chat server for the browser, on Trio."""

from __future__ import annotations

__version__ = "0.1.0"

from .config import Config as Config
from .errors import ClientProtocolError as ClientProtocolError
from .errors import ConfigError as ConfigError
from .errors import StorageError as StorageError
from .errors import TriochatError as TriochatError
from .server import Server as Server
from .server import serve as serve

__all__ = [
    "ClientProtocolError",
    "Config",
    "ConfigError",
    "Server",
    "StorageError",
    "TriochatError",
    "__version__",
    "serve",
]
