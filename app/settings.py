"""Service settings: one table of IMAGE_PROXY_* variables, parsed and validated once.

Every variable is declared once in SETTINGS (name, parser, default, help). The settings table
of docs/configuration.md is generated from it (`python -m app.settings --markdown`) and a test
keeps the two equal. A bad start reports every bad variable together, each by name.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "IMAGE_PROXY_"
INPUT_FORMATS = ("jpeg", "png", "gif", "webp", "avif", "bmp", "tiff")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    """One or more IMAGE_PROXY_* variables are invalid; the message lists each of them."""


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not re.fullmatch(r"[0-9]+", text.strip()):
            raise ValueError("expected a whole number")
        value = int(text)
        if value < lo or (hi is not None and value > hi):
            raise ValueError(f"must be between {lo} and {hi}" if hi is not None else f"must be at least {lo}")
        return value

    return parse


def _derived_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Empty means "derive it from the other settings" (None); anything else is parsed."""

    def parse_or_none(text: str) -> Any:
        return None if not text.strip() else parse(text)

    return parse_or_none


def _seconds(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("expected a number of seconds") from None
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi} seconds")
        return value

    return parse


def _score(text: str) -> float:
    """An SSIMULACRA2 score (100 = identical); kept to one decimal, since it names cache keys."""
    try:
        value = round(float(text), 1)
    except ValueError:
        raise ValueError("expected an SSIMULACRA2 score such as 70") from None
    if not 10 <= value <= 100:
        raise ValueError("must be between 10 and 100")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false, on/off, yes/no or 1/0")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return lowered

    return parse


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _widths(text: str) -> tuple[int, ...]:
    parse = _int(1)
    return tuple(sorted({parse(item) for item in _items(text)}))


def _ports(text: str) -> tuple[int, ...]:
    parse = _int(1, 65535)
    return tuple(sorted({parse(item) for item in _items(text)}))


def _networks(text: str) -> tuple[Network, ...]:
    networks = []
    for item in _items(text):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR range such as 10.0.0.0/8 or fd00::/8") from None
    return tuple(networks)


_HOST_PATTERN = re.compile(r"(\*\.)?([a-z0-9-]+\.)*[a-z0-9-]+|\[[0-9a-f:.]+\]|[0-9.]+")


def _hosts(text: str) -> tuple[str, ...]:
    hosts = []
    for item in _items(text.lower()):
        item = item.rstrip(".")
        if not _HOST_PATTERN.fullmatch(item):
            raise ValueError(f"{item!r} is not a host name or a *.example.com pattern")
        hosts.append(item)
    return tuple(hosts)


def _formats(text: str) -> frozenset[str]:
    chosen = {item.lower() for item in _items(text)}
    unknown = chosen - set(INPUT_FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(sorted(unknown))}; known: {', '.join(INPUT_FORMATS)}")
    return frozenset(chosen)


def _redis_url(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    if not re.match(r"(redis|rediss|unix)://", text):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return text


def _bind(text: str) -> str:
    text = text.strip()
    if text.startswith("unix:"):
        return text
    match = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})", text)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError("expected HOST:PORT (e.g. 127.0.0.1:8000) or unix:/path")
    return text


def _optional_bind(text: str) -> str:
    return _bind(text) if text.strip() else ""
def _admin_token(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    # A short token can be guessed over the network; refuse it at start, not at first use.
    if len(text) < 16:
        raise ValueError("must be at least 16 characters (or empty to switch /admin off)")
    if not re.fullmatch(r"[\x21-\x7e]+", text):
        raise ValueError("expected printable ASCII without spaces")
    return text


def _token(text: str) -> str:
    text = text.strip()
    if not re.fullmatch(r"[A-Za-z0-9._~-]{1,64}", text):
        raise ValueError("expected a short token of letters, digits and . _ ~ -")
    return text


#: A shorter secret could be guessed offline from one signed URL; 32 characters of a random
#: token are well past that, and HMAC-SHA256 gains nothing from a key over 64 bytes.
MIN_SIGNING_KEY_LENGTH = 32


def parse_signing_keys(text: str) -> tuple[str, ...]:
    """Comma-separated keys, each at least MIN_SIGNING_KEY_LENGTH characters; empty = signing
    off. Shared with app/signing.py's helper. The error never contains a key."""
    keys = tuple(_items(text))
    for position, key in enumerate(keys, start=1):
        if len(key) < MIN_SIGNING_KEY_LENGTH:
            raise ValueError(
                f"key {position} of {len(keys)} has {len(key)} characters; each key needs at least "
                f"{MIN_SIGNING_KEY_LENGTH} (e.g. from `openssl rand -base64 33`)"
            )
    return keys


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024); empty means 0 (derived)."""
    if not text.strip():
        return 0
    match = re.fullmatch(r"([0-9]+)\s*([KMGT]?)i?B?", text.strip(), re.IGNORECASE)
    if not match:
        raise ValueError("expected bytes such as 1610612736, 1536M or 2G")
    value = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 64 * _UNITS["M"]:
        raise ValueError("must be at least 64M")
    return value


@dataclass(frozen=True)
class Spec:
    """How one variable is read: the attribute it fills, its parser, default and meaning."""

    attr: str
    parse: Callable[[str], Any]
    default: str
    help: str
    #: Its value is never printed, not even in the start-up error that names it.
    secret: bool = False

    @property
    def env(self) -> str:
        return PREFIX + self.attr.upper()


MIB = 1024 * 1024


def setting(parse: Callable[[str], Any], default: str, help: str, *, secret: bool = False) -> Any:
    """One setting, declared once: its parser, its default as the environment would spell
    it (parsed here, so the two cannot disagree) and its meaning (docs/configuration.md)."""
    return field(default=parse(default), repr=not secret,
                 metadata={"parse": parse, "default": default, "help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    bind: str = setting(_bind, "127.0.0.1:8000", "Address gunicorn listens on.")
    workers: int = setting(_int(1, 64), "2", "gunicorn worker processes (one per core measured best on 2 cores).")
    threads: int = setting(_int(2, 256), "64", "Threads per worker: fetches, renders, dedup waiters and cache hits; THREADS - MAX_QUEUE stay free for hits.")
    redis_url: str | None = setting(_redis_url, "", "redis://, rediss:// or unix:// URL of a shared Redis; empty starts an embedded one.")
    redis_cluster: bool = setting(_bool, "false", "Treat REDIS_URL as one node of a Redis Cluster.")
    redis_timeout: float = setting(_seconds(0.01, 10), "0.25", "Socket timeout for Redis commands; past it a request is served uncached (BYPASS).")
    redis_maxmemory: int = setting(_int(0), str(256 * MIB), "Embedded Redis only: bytes of cache before least-recently-used entries are evicted (0 = no limit).")
    cache_ttl: int = setting(_int(1), "86400", "Seconds a rendered image is fresh (served without asking the upstream); it is kept STALE_TTL longer.")
    stale_ttl: int = setting(_int(0), "604800", "Seconds an entry is kept after CACHE_TTL ends: revalidated on the next request, served with X-Cache: STALE while the upstream fails (see docs/cache-lifecycle.md).")
    source_ttl: int = setting(_int(0), "300", "Seconds a fetched source is kept in Redis so other sizes and formats of it render without another download (0 = not kept).")
    source_max_bytes: int = setting(_int(0), str(8 * MIB), "Sources larger than this are not kept (each variant then fetches its own).")
    source_cache_bytes: int | None = setting(_derived_or(_int(0)), "", "Bytes of kept sources in Redis at most; past it the oldest kept sources are dropped, so downloads never push rendered images out. Empty = a quarter of REDIS_MAXMEMORY (64 MiB when that is 0).")
    error_ttl: int = setting(_int(0), "10", "Seconds a failure is cached, so waiters and followers get it without refetching.")
    max_cache_entry_bytes: int = setting(_int(1), str(16 * MIB), "Outputs larger than this are served but not cached.")
    upstream_timeout: float = setting(_seconds(0.1, 300), "20", "One deadline for connect, headers and the whole upstream body (never past the request budget).")
    request_budget: float = setting(_seconds(1, 600), "30", "The one budget of a request: fetch, lock wait, render-slot wait and render finish within it or answer 503/504. gunicorn's graceful_timeout is derived from it.")
    lock_expire: int | None = setting(_derived_or(_int(2, 3600)), "", "Seconds a render lock lives unless renewed (renewed every third of it while held): a dead holder's key is free this long after it died. Empty = 10, or REQUEST_BUDGET / 3 when that is shorter (at least 2).")
    render_slots: int = setting(_int(1, 64), "2", "Renders that run at once per worker; more wait for a slot, within the request budget.")
    max_queue: int | None = setting(_derived_or(_int(1, 255)), "", "Misses fetching or rendering at once per worker (dedup waiters do not count); empty = THREADS - THREADS/8, keeping an eighth of the threads for hits. Must be below THREADS.")
    memory_budget: int = setting(_size, "", "Bytes (K/M/G suffixes) the whole service may use, renders and fetched bodies included; empty: 80 % of the cgroup limit or RAM.")
    recycle_renders: int = setting(_int(0), "2000", "A worker is replaced gracefully after this many renders (+ up to 10 % jitter), so a slow leak in a native codec cannot grow; 0 = never. Hits do not count.")
    max_source_bytes: int = setting(_int(1), str(32 * MIB), "Upstream bodies longer than this are refused (400).")
    max_source_pixels: int = setting(_int(1), "50000000", "Sources with more pixels (width x height, per frame) are refused before decoding.")
    max_width: int = setting(_int(1, 65535), "8192", "Largest accepted w.")
    allowed_widths: tuple[int, ...] = setting(_widths, "", "Comma-separated list; when set, w must be 0 or one of them.")
    auto_quality_target: float = setting(_score, "70", "SSIMULACRA2 score that q=auto reaches with the fewest bytes (90 visually lossless, 70 high, 50 medium; see docs/image-fidelity.md). Part of the cache key of q=auto answers.")
    max_animation_frames: int = setting(_int(1), "300", "Animated sources with more frames are refused (400).")
    allowed_hosts: tuple[str, ...] = setting(_hosts, "", "Comma-separated host names or *.example.com patterns; when set, only these are fetched.")
    allow_networks: tuple[Network, ...] = setting(_networks, "", "Comma-separated CIDRs exempt from the public-address rule (any port).")
    allowed_ports: tuple[int, ...] = setting(_ports, "80,443", "Ports allowed on public addresses.")
    via_token: str = setting(_token, "image-proxy", "Token of the Via header sent upstream; requests carrying it are refused as loops.")
    input_formats: frozenset[str] = setting(_formats, ",".join(INPUT_FORMATS), "Source formats that are decoded; drop one to switch its decoder off.")
    log_format: str = setting(_choice("text", "json"), "text", "Access log format: text or json.")
    front_page: bool = setting(_bool, "on", "Serve the try-it page at /; off makes / a 404.")
    trusted_proxies: tuple[Network, ...] = setting(_networks, "127.0.0.1/32,::1/128", "Comma-separated CIDRs of proxies (nginx) whose X-Forwarded-For names the client in the access log; other peers are logged as they are.")
    metrics_bind: str = setting(_optional_bind, "", "Second listener (HOST:PORT) for /metrics and /healthz only; when set, /metrics is a 404 on BIND. When empty, /metrics answers loopback peers only.")
    admin_token: str = setting(_admin_token, "", "Bearer token for POST /admin/warm and /admin/purge (at least 16 characters); empty makes /admin/* a 404.", secret=True)
    signing_keys: tuple[str, ...] = setting(parse_signing_keys, "", "Comma-separated keys (each at least 32 characters) for signed URLs: when set, /image needs a valid s (any key verifies, the first signs) and the front page is off; empty = no signing (docs/security.md).", secret=True)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        values: dict[str, Any] = {}
        problems: list[str] = []
        for spec in SETTINGS:
            raw = environ.get(spec.env)
            if raw is None:
                continue
            try:
                values[spec.attr] = spec.parse(raw)
            except ValueError as exc:
                shown = "<hidden>" if spec.secret else repr(raw)
                problems.append(f"{spec.env}={shown}: {exc}")
        threads, max_queue = values.get("threads", cls.threads), values.get("max_queue")
        if not problems and max_queue is not None and max_queue >= threads:
            problems.append(
                f"{PREFIX}MAX_QUEUE={max_queue} must be below {PREFIX}THREADS={threads}, "
                "or cache hits would wait behind misses"
            )
        if problems:
            raise SettingsError("invalid settings:\n  " + "\n  ".join(problems))
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # Derived values: a setting left empty follows the ones it depends on, so any single
    # setting can be changed alone (THREADS=4 needs no MAX_QUEUE).

    @property
    def miss_places(self) -> int:
        """Misses that may fetch or render at once in one worker."""
        if self.max_queue is not None:
            return self.max_queue
        return max(1, self.threads - max(1, self.threads // 8))

    @property
    def lock_seconds(self) -> int:
        """Render-lock expiry. The lock lives as long as its holder because it is renewed,
        not because the expiry is long: short, so a dead holder's waiters take over well
        inside their own budget (SPEC §6)."""
        if self.lock_expire is not None:
            return self.lock_expire
        return max(2, min(10, int(self.request_budget / 3)))

    @property
    def source_cache_limit(self) -> int:
        """Bytes of kept sources at most (SOURCE_CACHE_BYTES, derived when empty)."""
        if self.source_cache_bytes is not None:
            return self.source_cache_bytes
        return self.redis_maxmemory // 4 if self.redis_maxmemory else 64 * MIB

    @property
    def graceful_seconds(self) -> int:
        """gunicorn's graceful_timeout: an in-flight request always finishes on HUP/TERM."""
        return int(self.request_budget) + 5


SETTINGS: tuple[Spec, ...] = tuple(
    Spec(f.name, f.metadata["parse"], f.metadata["default"], f.metadata["help"], f.metadata["secret"])
    for f in dataclasses.fields(Settings)
)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """IMAGE_PROXY_* names that no setting reads: most likely typos, worth a warning at start."""
    known = {spec.env for spec in SETTINGS}
    return sorted(name for name in environ if name.startswith(PREFIX) and name not in known)


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for spec in SETTINGS:
        rows.append(f"| `{spec.env}` | `{spec.default}` | {spec.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown_table())
    else:
        try:
            print(Settings.from_env(__import__("os").environ))
        except SettingsError as exc:
            sys.exit(str(exc))
