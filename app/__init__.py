"""image-proxy: an image-optimizing HTTP proxy (the Flask app is built by app.factory.create_app).

This package's __init__ imports nothing: the gunicorn master imports app.settings,
app.embedded_redis and app.memory (standard library only), and anything imported here
would be loaded into the master and handed to every worker it forks, so a reload (HUP)
would keep serving the old code.
"""

from __future__ import annotations

from typing import Any

__version__ = "1.0.0"


def __getattr__(name: str) -> Any:
    # `from app import create_app` still works, but loads Flask only when it is asked for.
    if name == "create_app":
        from app.factory import create_app

        return create_app
    raise AttributeError(f"module 'app' has no attribute {name!r}")
