"""How a render's failures become answers: the one translation, shared by render() and the
memory estimate (app/render/estimate.py), so both refuse the same bytes the same way."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import BadSource, OutOfMemory, ProxyError

log = logging.getLogger("image_proxy.render")


@contextmanager
def as_proxy_errors() -> Iterator[None]:
    """ProxyErrors pass; a MemoryError is a 503 (the machine's state); any exception raised
    inside Pillow or the AVIF plugin is a 400 (the bytes are corrupt or unsupported).
    Anything else is a bug and propagates."""
    try:
        yield
    except ProxyError:
        raise
    except MemoryError:
        raise OutOfMemory("not enough memory to render this image right now; retry shortly", retry_after=5) from None
    except Exception as exc:
        # Frames are decoded lazily, so a decoder error can surface in any later step.
        # Pillow raises many exception types for bad data; all of them mean the same here.
        if _from_pillow(exc):
            log.info("the image data is corrupt or unsupported: %r", (str(exc) or type(exc).__name__)[:160])
            raise BadSource("the image data is corrupt or unsupported") from None
        raise


def _from_pillow(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith(("PIL.", "pillow_avif")):
            return True
        tb = tb.tb_next
    return False
