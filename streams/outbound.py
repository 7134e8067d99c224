"""The SSRF-safe outbound HTTP client (webhooks, Slack).

Outbound URLs are configured by tenants, so they are hostile input: a URL
must not reach casestream's own network (databases, Kafka, the cloud
metadata service, admin ports on localhost). ``post`` enforces:

1. ``validate_url``: https only (http only with ``require_https=False``), no
   userinfo, a host, port 80, 443 or >= 1024, no non-canonical numeric hosts
   (``127.1``, ``2130706433``, ``0x7f.0.0.1``) and no IPv6 zone ids. An IP
   literal is checked against the address policy right there.
2. ``resolve_and_check``: the host is resolved ONCE, and the request is
   refused when ANY of its addresses is forbidden (loopback, private,
   link-local, CGNAT, unique-local, unspecified, multicast, reserved,
   documentation/benchmark ranges, IPv4-mapped / 6to4 / NAT64 / Teredo
   embeddings of those, cloud metadata addresses) and not allowlisted.
3. Pinning: the connection goes to the checked addresses only. The
   aiohttp connector gets a resolver (``PinnedResolver``) that answers the
   target host with those addresses and refuses every other name, and its
   DNS cache is off; aiohttp still uses the URL's hostname for the Host
   header, TLS SNI and certificate verification. DNS rebinding between the
   check and the connect has nothing to rebind: there is no second lookup.
4. No redirects (``allow_redirects=False``: a 3xx is returned as is), no
   proxies from the environment (``trust_env=False``), a total timeout
   covering resolution, connect, request and response, the response body
   read up to ``max_response_bytes`` (no decompression: ``Accept-Encoding:
   identity``).

Network problems come back as values (``Response.status`` None and
``error`` "<kind>: <detail>", kind one of timeout, dns, connect, tls,
protocol, http); a URL or address refused by policy raises ``Refused``
before anything is sent.

Allowlist entries (``allow``) are CIDRs (``"127.0.0.0/8"``, ``"10.1.2.3"``,
``"fd00::/8"``) or host names (``"hooks.internal"``). A CIDR permits the
forbidden addresses it contains (for an IPv4-mapped/embedded address, the
embedded IPv4 address is matched too); a host name permits whatever that
name resolves to. Cloud metadata addresses are only permitted by an entry
naming exactly that address (``"169.254.169.254/32"``), never by a wider
network or a host name.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl as _ssl
import time
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "casestream/1"
MAX_URL = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refused(Exception):
    """A URL or address refused by the outbound policy; nothing was sent."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------
# address policy
# --------------------------------------------------------------------------

_N = ipaddress.ip_network

METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean ... instance metadata
    "fd00:ec2::254",    # AWS IMDS over IPv6
    "169.254.170.2",    # AWS ECS task metadata / credentials
    "169.254.170.23",   # AWS EKS pod identity agent
    "fd00:ec2::23",     # AWS EKS pod identity agent over IPv6
    "100.100.100.200",  # Alibaba Cloud metadata
    "192.0.0.192",      # Oracle Cloud metadata
))

_FORBIDDEN_V4 = (
    (_N("0.0.0.0/8"), "unspecified"),
    (_N("127.0.0.0/8"), "loopback"),
    (_N("10.0.0.0/8"), "private"),
    (_N("172.16.0.0/12"), "private"),
    (_N("192.168.0.0/16"), "private"),
    (_N("169.254.0.0/16"), "link-local"),
    (_N("100.64.0.0/10"), "CGNAT"),
    (_N("192.0.0.0/24"), "reserved"),        # IETF protocol assignments
    (_N("192.0.2.0/24"), "reserved"),        # documentation
    (_N("198.51.100.0/24"), "reserved"),     # documentation
    (_N("203.0.113.0/24"), "reserved"),      # documentation
    (_N("192.88.99.0/24"), "reserved"),      # 6to4 relay anycast
    (_N("198.18.0.0/15"), "reserved"),       # benchmarking
    (_N("224.0.0.0/4"), "multicast"),
    (_N("240.0.0.0/4"), "reserved"),         # incl. 255.255.255.255
)
_FORBIDDEN_V6 = (
    (_N("::/128"), "unspecified"),
    (_N("::1/128"), "loopback"),
    (_N("::/96"), "reserved"),               # IPv4-compatible (deprecated)
    (_N("100::/64"), "reserved"),            # discard-only
    (_N("2001:db8::/32"), "reserved"),       # documentation
    (_N("fc00::/7"), "unique-local"),
    (_N("fe80::/10"), "link-local"),
    (_N("fec0::/10"), "link-local"),         # site-local (deprecated)
    (_N("ff00::/8"), "multicast"),
)
_NAT64 = (_N("64:ff9b::/96"), _N("64:ff9b:1::/48"))


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, Teredo client, NAT64)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in n for n in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` may not be contacted (ignoring any allowlist), or None."""
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    if isinstance(ip, ipaddress.IPv4Address):
        for net, why in _FORBIDDEN_V4:
            if ip in net:
                return why
        if ip.is_multicast or ip.is_reserved or ip.is_private or not ip.is_global:
            return "non-global"
        return None
    v4 = _embedded_v4(ip)
    if v4 is not None:
        inner = forbidden_reason(v4)
        if inner is not None:
            kind = ("IPv4-mapped" if ip.ipv4_mapped is not None else "6to4" if ip.sixtofour is not None
                    else "Teredo" if ip.teredo is not None else "NAT64")
            return f"{kind} {inner}"
        if ip.ipv4_mapped is not None or any(ip in n for n in _NAT64):
            return None  # reaches exactly that (global) IPv4 address
        # 6to4 / Teredo / NAT64 of a global address: judged as IPv6 below
    for net, why in _FORBIDDEN_V6:
        if ip in net:
            return why
    if ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_site_local or not ip.is_global:
        return "non-global"
    return None


@dataclass(frozen=True)
class Allowlist:
    """Parsed allowlist entries: networks and host names (lower case, no trailing dot)."""

    networks: tuple = ()
    hosts: frozenset = frozenset()

    @classmethod
    def parse(cls, entries: Iterable[str] | "Allowlist" | None) -> "Allowlist":
        if isinstance(entries, Allowlist):
            return entries
        nets, hosts = [], set()
        for e in entries or ():
            if not isinstance(e, str) or not e.strip():
                raise ValueError(f"allowlist entry {e!r} is not a CIDR or host name")
            e = e.strip()
            try:
                nets.append(ipaddress.ip_network(e, strict=False))
                continue
            except ValueError:
                pass
            h = e.lower().rstrip(".")
            if not re.fullmatch(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*", h, re.ASCII):
                raise ValueError(f"allowlist entry {e!r} is not a CIDR or host name")
            hosts.add(h)
        return cls(tuple(nets), frozenset(hosts))

    def permits(self, ip: IPAddress, host: str | None = None) -> bool:
        """True when an entry permits contacting ``ip`` (reached via ``host``)."""
        if ip in METADATA_ADDRESSES:
            return any(n.num_addresses == 1 and n.network_address == ip for n in self.networks)
        if host is not None and host.lower().rstrip(".") in self.hosts:
            return True
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            v4 = _embedded_v4(ip)
            if v4 is not None:
                candidates.append(v4)
        return any(c.version == n.version and c in n for c in candidates for n in self.networks)


def check_address(ip: str | IPAddress, allow=None, host: str | None = None) -> None:
    """Raise ``Refused`` when ``ip`` is forbidden and not allowlisted."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    why = forbidden_reason(addr)
    if why is not None and not Allowlist.parse(allow).permits(addr, host):
        via = f"{host} resolves to " if host and host != str(addr) else ""
        raise Refused(f"{via}{addr}: forbidden address ({why}), not allowlisted")


# --------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedTarget:
    """A URL that passed ``validate_url``. ``url`` is what is requested;
    ``host`` the name to resolve (IDNA-encoded, lower case) and to present
    in Host/SNI; ``ip`` the address when the host is an IP literal."""

    url: URL
    scheme: str
    host: str
    port: int
    ip: str | None = None


_NUMERIC_HOST_RE = re.compile(r"((0x[0-9a-f]*|[0-9]+)\.?)+", re.ASCII)


def validate_url(url: str, allow=(), require_https: bool = True) -> ParsedTarget:
    """Check a URL's form (and an IP literal host against the address
    policy); raise ``Refused`` with the reason, else return the target."""
    if not isinstance(url, str) or not url:
        raise Refused("no URL")
    if len(url) > MAX_URL:
        raise Refused(f"URL longer than {MAX_URL} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url) or "\\" in url:
        raise Refused("URL contains whitespace, control characters or backslashes")
    try:
        parsed = URL(url)
        netloc = urlsplit(url).netloc
    except ValueError as e:
        raise Refused(f"invalid URL: {e}") from None
    scheme = parsed.scheme.lower()
    if scheme == "http":
        if require_https:
            raise Refused("http URLs are not allowed (https required)")
    elif scheme != "https":
        raise Refused(f"scheme {parsed.scheme!r} is not allowed (https only)" if scheme else "URL has no scheme")
    if "@" in netloc or parsed.raw_user is not None or parsed.raw_password is not None:
        raise Refused("URLs with credentials (user:password@) are not allowed")
    host = parsed.raw_host
    if not host:
        raise Refused("URL has no host")
    if "%" in host:
        raise Refused("IPv6 zone ids are not allowed")
    port = parsed.port
    if port is None or not (port in (80, 443) or 1024 <= port <= 65535):
        raise Refused(f"port {port} is not allowed (80, 443 or 1024-65535)")
    ip = None
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if _NUMERIC_HOST_RE.fullmatch(host.lower()):
            raise Refused(f"non-canonical numeric host {host!r}") from None
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", host, re.ASCII):
            raise Refused(f"invalid host {host!r}")
    else:
        check_address(addr, allow)
        ip = str(addr)
    return ParsedTarget(url=parsed, scheme=scheme, host=host.lower(), port=port, ip=ip)


# --------------------------------------------------------------------------
# resolution and pinning
# --------------------------------------------------------------------------


async def _getaddrinfo(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (tests replace this)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    out = []
    for family, _, _, _, sockaddr in infos:
        a = sockaddr[0]
        if family == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3]:
            a = f"{a}%{sockaddr[3]}"
        out.append(a)
    return out


async def resolve_and_check(host: str, port: int, allow=()) -> list[str]:
    """Resolve ``host`` once and return its addresses (de-duplicated, in
    resolver order), or raise ``Refused`` when any of them is forbidden and
    not allowlisted, or has a zone id. Resolution failures raise OSError
    (``socket.gaierror``)."""
    allowlist = Allowlist.parse(allow)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        check_address(literal, allowlist)
        return [str(literal)]
    resolved = await _getaddrinfo(host, port)
    addresses: list[str] = []
    for a in resolved:
        if "%" in a:
            raise Refused(f"{host} resolves to a scoped address {a}")
        norm = str(ipaddress.ip_address(a))
        if norm not in addresses:
            addresses.append(norm)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, f"{host} has no addresses")
    for a in addresses:
        check_address(a, allowlist, host)
    return addresses


class PinnedResolver(AbstractResolver):
    """An aiohttp resolver that answers ``host`` with the pre-checked
    ``addresses`` and refuses every other name."""

    def __init__(self, host: str, addresses: list[str]):
        self.host = host.lower().rstrip(".")
        self.addresses = list(addresses)
        self.calls = 0

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        self.calls += 1
        if host.lower().rstrip(".") != self.host:
            raise OSError(f"pinned resolver: refusing to resolve {host!r} (pinned to {self.host!r})")
        out: list[ResolveResult] = []
        for a in self.addresses:
            fam = socket.AF_INET6 if ":" in a else socket.AF_INET
            if family not in (0, socket.AF_UNSPEC) and fam != family:
                continue
            out.append(ResolveResult(hostname=host, host=a, port=port, family=fam, proto=0,
                                     flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV))
        if not out:
            raise OSError(f"pinned resolver: no address of family {family} for {host!r}")
        return out

    async def close(self) -> None:
        pass


# --------------------------------------------------------------------------
# post
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    """The result of ``post``. ``status`` None means no HTTP response
    (``error`` says why). ``headers``: lower-cased names (repeated headers
    joined with ", "). ``body_prefix``: at most ``max_response_bytes`` of the
    body (``truncated`` when there was more). ``error`` may accompany a
    status when reading the body failed: the status still counts.
    ``addresses``: the checked addresses the connection was pinned to.
    ``elapsed``: seconds, resolution included."""

    status: int | None
    headers: dict[str, str]
    body_prefix: bytes
    elapsed: float
    error: str | None = None
    truncated: bool = False
    addresses: tuple[str, ...] = field(default=())

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


_MANAGED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


def _request_headers(headers: dict | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (headers or {}).items():
        if k.lower() in _MANAGED_HEADERS:
            raise ValueError(f"header {k!r} is set by the client, not by callers")
        out[k] = v
    lower = {k.lower() for k in out}
    if "user-agent" not in lower:
        out["User-Agent"] = USER_AGENT
    if "accept-encoding" not in lower:
        out["Accept-Encoding"] = "identity"
    if "content-type" not in lower:
        out["Content-Type"] = "application/json"
    return out


def _error(kind: str, exc: BaseException) -> str:
    detail = str(exc) or type(exc).__name__
    return f"{kind}: {detail}"


def _classify_exception(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return f"timeout: no response within {timeout:g} s"
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, _ssl.SSLError)):
        return _error("tls", exc)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return _error("dns", exc)
    if isinstance(exc, (aiohttp.ClientConnectorError, ConnectionError)):
        return _error("connect", exc)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                        aiohttp.ClientResponseError)):
        return _error("protocol", exc)
    if isinstance(exc, aiohttp.ClientError):
        return _error("http", exc)
    return _error("connect", exc)


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    buf = bytearray()
    while len(buf) <= limit:
        chunk = await resp.content.read(limit + 1 - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf[:limit]), len(buf) > limit


async def post(url: str, body: bytes, headers: dict | None = None, *, timeout: float = DEFAULT_TIMEOUT,
               allow=(), require_https: bool = True, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
               ssl_context: _ssl.SSLContext | None = None) -> Response:
    """POST ``body`` to ``url`` under the outbound policy (module docstring).

    Raises ``Refused`` (nothing sent) for a URL or resolved address the
    policy refuses, ValueError for caller headers the client manages (Host,
    Content-Length, Transfer-Encoding, Connection). Everything else comes
    back as a ``Response``. ``ssl_context``: for a private CA (default: the
    system's trust store, verification on). Content-Type defaults to
    application/json, User-Agent to casestream/1.
    """
    allowlist = Allowlist.parse(allow)
    target = validate_url(url, allowlist, require_https)
    hdrs = _request_headers(headers)
    start = time.monotonic()

    def elapsed() -> float:
        return time.monotonic() - start

    try:
        async with asyncio.timeout(timeout):
            addresses = await resolve_and_check(target.host, target.port, allowlist)
    except Refused:
        raise
    except (asyncio.TimeoutError, TimeoutError):
        return Response(None, {}, b"", elapsed(), f"timeout: resolving {target.host} took over {timeout:g} s")
    except (OSError, UnicodeError, ValueError) as e:
        return Response(None, {}, b"", elapsed(), _error("dns", e))

    pinned = tuple(addresses)
    remaining = max(0.001, timeout - elapsed())
    connector = aiohttp.TCPConnector(resolver=PinnedResolver(target.host, addresses), use_dns_cache=False,
                                     force_close=True, limit=1,
                                     ssl=ssl_context if ssl_context is not None else True)
    status: int | None = None
    resp_headers: dict[str, str] = {}
    try:
        async with asyncio.timeout(remaining):
            async with aiohttp.ClientSession(connector=connector, trust_env=False, auto_decompress=False,
                                             timeout=aiohttp.ClientTimeout(total=remaining)) as session:
                async with session.post(target.url, data=body, headers=hdrs, allow_redirects=False) as resp:
                    status = resp.status
                    for k, v in resp.headers.items():
                        k = k.lower()
                        resp_headers[k] = f"{resp_headers[k]}, {v}" if k in resp_headers else v
                    try:
                        prefix, truncated = await _read_capped(resp, max_response_bytes)
                    except (asyncio.TimeoutError, TimeoutError, aiohttp.ClientError, OSError) as e:
                        err = ("timeout: reading the response body" if isinstance(e, TimeoutError)
                               else _error("protocol", e))
                        return Response(status, resp_headers, b"", elapsed(), err, False, pinned)
        return Response(status, resp_headers, prefix, elapsed(), None, truncated, pinned)
    except (asyncio.TimeoutError, TimeoutError, aiohttp.ClientError, OSError, _ssl.SSLError) as e:
        if status is not None:  # the answer came; only closing failed
            return Response(status, resp_headers, b"", elapsed(), _classify_exception(e, timeout), False, pinned)
        return Response(None, {}, b"", elapsed(), _classify_exception(e, timeout), False, pinned)
    finally:
        if not connector.closed:
            await connector.close()
