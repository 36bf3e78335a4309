"""``python -m triochat``."""

from .cli import main

main()
