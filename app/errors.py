"""The ProxyError family: each error knows its HTTP status and public message.

Raised anywhere in the pipeline; turned into a response in exactly one place
(`error_response`, registered by `create_app`). Anything that is not a ProxyError is a
bug: logged with a traceback and answered with a plain 500.
"""

from __future__ import annotations

from typing import ClassVar


class ProxyError(Exception):
    """A failure with a public reason. `status` is the HTTP status it becomes.

    `message` is the response body: a fixed reason, at most naming what the client sent.
    Never put an exception's text or upstream bytes in it (a banner from an internal port, a
    TLS library's detail, the address a name resolved to): those go in `detail`, which is
    logged and shown by str() (tracebacks, tests), never sent."""

    status: ClassVar[int] = 500
    kind: ClassVar[str] = "internal"
    #: Whether the failure is about the image or the upstream, so it is stored for ERROR_TTL and
    #: shared with waiters and followers; False: about this request's own circumstances (its
    #: parameters, its budget, memory right now), so the waiters try for themselves.
    cacheable: ClassVar[bool] = True

    def __init__(self, message: str, *, retry_after: int | None = None, detail: str = "") -> None:
        super().__init__(f"{message} ({detail})" if detail else message)
        self.message = message
        self.retry_after = retry_after
        self.detail = detail


class BadParameter(ProxyError):
    status = 400
    kind = "bad_parameter"
    cacheable = False


class BadSignature(ProxyError):
    """Signing is on and `s` is missing or verifies under no key: refused before any cache
    look or fetch, so an unsigned URL costs the service nothing."""

    status = 403
    kind = "bad_signature"
    cacheable = False


class SourceNotAllowed(ProxyError):
    """The URL's scheme, host, port or resolved address is refused by policy."""

    status = 400
    kind = "not_allowed"


class LoopDetected(SourceNotAllowed):
    kind = "loop"
    cacheable = False


class BadSource(ProxyError):
    """The upstream body is not an image we can render: unsupported, corrupt or too big."""

    status = 400
    kind = "bad_source"


class SourceTooLarge(BadSource):
    kind = "too_large"


class OverMemoryBudget(SourceTooLarge):
    """The render would need more memory than the whole service's budget allows, even alone.

    Stored like the other 400s: it depends only on the image and IMAGE_PROXY_MEMORY_BUDGET,
    and a setting change restarts the service, well past ERROR_TTL.
    """

    kind = "over_memory_budget"


class SourceNotFound(ProxyError):
    status = 404
    kind = "not_found"


class UpstreamFailed(ProxyError):
    status = 502
    kind = "upstream_failed"


class UpstreamRefused(UpstreamFailed):
    """The upstream answered, with a 4xx other than 404/410 (401, 403, 429, 451...): it is up
    and said no, so a stale copy is not served for it (SPEC §10: only 5xx, refused or timed out)."""

    kind = "upstream_refused"


class TooManyRedirects(UpstreamFailed):
    kind = "too_many_redirects"


class UpstreamTimeout(ProxyError):
    status = 504
    kind = "upstream_timeout"


class Busy(ProxyError):
    """Overloaded or waited too long for another request's render: try again shortly."""

    status = 503
    kind = "busy"
    cacheable = False

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class OutOfMemory(Busy):
    """The machine had no memory for this render just now: a 503 to retry, never stored,
    because it says nothing about the image."""

    kind = "out_of_memory"
