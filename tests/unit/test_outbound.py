"""streams.outbound: URL and address policy, pinning, and post() against real local servers.

Servers are aiohttp.web apps on 127.0.0.1 (free ports) started inside each
test's event loop; they record every request they get, so "nothing was
sent" is asserted, not assumed.
"""

import asyncio
import ipaddress
import shutil
import socket
import ssl
import subprocess
import time

import pytest
from aiohttp import web

from streams import outbound
from streams.domain.delivery import DELIVERED, PERMANENT, RETRY, classify
from streams.outbound import (Allowlist, PinnedResolver, Refused, check_address, forbidden_reason, post,
                              resolve_and_check, validate_url)

LOOPBACK = ["127.0.0.0/8"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


class Server:
    def __init__(self, handler, host="127.0.0.1", port=0, ssl_context=None):
        self.handler = handler
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.requests: list[dict] = []
        self.release = asyncio.Event()  # lets slow handlers finish before shutdown

    async def _handle(self, request: web.Request):
        self.requests.append({"method": request.method, "path": request.path_qs, "headers": dict(request.headers),
                              "body": await request.read()})
        return await self.handler(request, self)

    async def __aenter__(self):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc):
        self.release.set()
        await self.runner.cleanup()

    def url(self, path="/hook", host=None):
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"


def answer(status=200, body=b"ok", headers=None):
    async def h(request, server):
        return web.Response(status=status, body=body, headers=headers or {})
    return h


async def post_local(url, body=b'{"a":1}', headers=None, **kw):
    kw.setdefault("allow", LOOPBACK)
    kw.setdefault("require_https", False)
    return await post(url, body, headers or {}, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_dns(monkeypatch):
    """Replace resolution: {host: [addresses]} (or a list of answers per call); counts calls."""
    calls: list[str] = []
    table: dict = {}

    async def fake(host, port):
        calls.append(host)
        answers = table.get(host)
        if answers is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if answers and isinstance(answers[0], list):  # one answer per call
            return answers[min(len(calls), len(answers)) - 1]
        return answers

    monkeypatch.setattr(outbound, "_getaddrinfo", fake)
    return table, calls


# --------------------------------------------------------------------------
# address policy
# --------------------------------------------------------------------------


@pytest.mark.parametrize("addr,why", [
    ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private"), ("172.16.0.1", "private"), ("172.31.255.255", "private"), ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("100.64.0.1", "CGNAT"), ("100.127.255.255", "CGNAT"),
    ("fc00::1", "unique-local"), ("fd12:3456::1", "unique-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.1", "reserved"),
    ("198.18.0.1", "reserved"),
    ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    ("169.254.170.2", "cloud metadata"),
    ("::ffff:127.0.0.1", "IPv4-mapped loopback"), ("::ffff:10.1.2.3", "IPv4-mapped private"),
    ("::ffff:169.254.169.254", "IPv4-mapped cloud metadata"), ("::ffff:100.64.0.1", "IPv4-mapped CGNAT"),
    ("::ffff:0.0.0.0", "IPv4-mapped unspecified"),
    ("2002:7f00:1::", "6to4 loopback"), ("2002:a00:1::", "6to4 private"),
    ("64:ff9b::a9fe:a9fe", "NAT64 cloud metadata"), ("64:ff9b::7f00:1", "NAT64 loopback"),
    ("::127.0.0.1", "reserved"),  # IPv4-compatible, deprecated
])
def test_forbidden(addr, why):
    assert forbidden_reason(ipaddress.ip_address(addr)) == why
    with pytest.raises(Refused):
        check_address(addr)


@pytest.mark.parametrize("addr", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "100.63.255.255", "100.128.0.0",
                                  "172.15.255.255", "172.32.0.0", "2606:4700:4700::1111", "2a00:1450:4001::1",
                                  "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"])
def test_global_addresses_pass(addr):
    assert forbidden_reason(ipaddress.ip_address(addr)) is None
    check_address(addr)


def test_allowlist():
    al = Allowlist.parse(["127.0.0.0/8", "10.1.0.0/16", "::1", "Hooks.Internal."])
    assert al.hosts == {"hooks.internal"}
    check_address("127.0.0.1", al)
    check_address("::ffff:127.0.0.1", al)       # the embedded IPv4 address is matched too
    check_address("::1", al)
    check_address("10.1.2.3", al)
    with pytest.raises(Refused):
        check_address("10.2.0.1", al)
    check_address("10.9.9.9", al, host="hooks.internal")   # a host entry permits what it resolves to
    with pytest.raises(Refused):
        check_address("10.9.9.9", al, host="other.internal")
    with pytest.raises(ValueError):
        Allowlist.parse(["not a host!"])
    with pytest.raises(ValueError):
        Allowlist.parse([""])


def test_metadata_needs_an_exact_allow_entry():
    for allow in (["169.254.0.0/16"], ["0.0.0.0/0"], ["::/0"], ["fd00::/8"]):
        with pytest.raises(Refused, match="metadata"):
            check_address("169.254.169.254", allow)
        with pytest.raises(Refused, match="metadata"):
            check_address("fd00:ec2::254", allow)
    with pytest.raises(Refused):
        check_address("169.254.169.254", ["metadata.internal"], host="metadata.internal")
    check_address("169.254.169.254", ["169.254.169.254/32"])
    check_address("169.254.1.1", ["169.254.0.0/16"])


# --------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------


def test_validate_url_ok():
    t = validate_url("https://Hooks.Example.com:8443/p?q=1")
    assert (t.scheme, t.host, t.port, t.ip) == ("https", "hooks.example.com", 8443, None)
    assert str(t.url) == "https://hooks.example.com:8443/p?q=1"
    assert validate_url("https://example.com/").port == 443
    assert validate_url("https://bücher.example/").host == "xn--bcher-kva.example"
    t = validate_url("https://8.8.8.8/x")
    assert t.ip == "8.8.8.8"
    assert validate_url("http://example.com/", require_https=False).port == 80


@pytest.mark.parametrize("url,reason", [
    ("http://example.com/", "https required"),
    ("ftp://example.com/", "not allowed"),
    ("file:///etc/passwd", "not allowed"),
    ("gopher://example.com:70/", "not allowed"),
    ("example.com/hook", "no scheme"),
    ("", "no URL"),
    ("https:///hook", "no host"),
    ("https://user:pw@example.com/", "credentials"),
    ("https://user@example.com/", "credentials"),
    ("https://@example.com/", "credentials"),
    ("https://example.com:22/", "port 22"),
    ("https://example.com:0/", "port 0"),
    ("https://example.com:99999/", "invalid URL"),
    ("https://exa mple.com/", "whitespace"),
    ("https://example.com/\r\nX: y", "control"),
    ("https://example.com\\@evil.com/", "backslash"),
    ("https://127.1/", "non-canonical"),
    ("https://2130706433/", "non-canonical"),
    ("https://0x7f.0.0.1/", "non-canonical"),
    ("https://017700000001/", "non-canonical"),
    ("https://[fe80::1%25eth0]/", "zone"),
    ("https://127.0.0.1/", "loopback"),
    ("https://10.0.0.8/", "private"),
    ("https://169.254.169.254/latest/meta-data/", "metadata"),
    ("https://[::1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "IPv4-mapped loopback"),
    ("https://100.64.1.2/", "CGNAT"),
    ("https://[fd00:ec2::254]/", "metadata"),
    ("https://example.com/" + "a" * 3000, "longer than"),
])
def test_validate_url_refused(url, reason):
    with pytest.raises(Refused, match=reason):
        validate_url(url)


def test_validate_url_allowlisted_literal():
    assert validate_url("https://127.0.0.1:8443/", LOOPBACK).ip == "127.0.0.1"
    assert validate_url("http://127.0.0.1:8080/", LOOPBACK, require_https=False).scheme == "http"


# --------------------------------------------------------------------------
# resolution and pinning
# --------------------------------------------------------------------------


def test_resolve_and_check(fake_dns):
    table, calls = fake_dns
    table["ok.example"] = ["93.184.216.34", "2606:2800:220:1::1", "93.184.216.34"]
    table["mixed.example"] = ["93.184.216.34", "10.0.0.5"]
    table["mapped.example"] = ["::ffff:127.0.0.1"]
    table["meta.example"] = ["169.254.169.254"]
    table["scoped.example"] = ["fe80::1%2"]
    table["empty.example"] = []
    assert run(resolve_and_check("ok.example", 443, [])) == ["93.184.216.34", "2606:2800:220:1::1"]
    with pytest.raises(Refused, match="mixed.example resolves to 10.0.0.5"):
        run(resolve_and_check("mixed.example", 443, []))
    with pytest.raises(Refused, match="IPv4-mapped loopback"):
        run(resolve_and_check("mapped.example", 443, []))
    with pytest.raises(Refused, match="metadata"):
        run(resolve_and_check("meta.example", 443, ["169.254.0.0/16", "meta.example"]))
    with pytest.raises(Refused, match="scoped"):
        run(resolve_and_check("scoped.example", 443, ["fe80::/10"]))
    with pytest.raises(socket.gaierror):
        run(resolve_and_check("empty.example", 443, []))
    with pytest.raises(socket.gaierror):
        run(resolve_and_check("nxdomain.example", 443, []))
    # literals are not resolved
    n = len(calls)
    assert run(resolve_and_check("8.8.8.8", 443, [])) == ["8.8.8.8"]
    with pytest.raises(Refused):
        run(resolve_and_check("::1", 443, []))
    assert len(calls) == n


def test_localhost_really_resolves_and_is_refused():
    with pytest.raises(Refused, match="localhost resolves to"):
        run(resolve_and_check("localhost", 80, []))
    assert "127.0.0.1" in run(resolve_and_check("localhost", 80, ["127.0.0.0/8", "::1"]))


def test_pinned_resolver():
    r = PinnedResolver("Hooks.Example.", ["93.184.216.34", "2606:2800:220:1::1"])
    out = run(r.resolve("hooks.example", 443, 0))
    assert [(x["host"], x["port"], x["family"], x["hostname"]) for x in out] == [
        ("93.184.216.34", 443, socket.AF_INET, "hooks.example"),
        ("2606:2800:220:1::1", 443, socket.AF_INET6, "hooks.example")]
    assert [x["host"] for x in run(r.resolve("hooks.example", 443, socket.AF_INET6))] == ["2606:2800:220:1::1"]
    with pytest.raises(OSError, match="refusing"):
        run(r.resolve("evil.example", 443, 0))
    with pytest.raises(OSError):
        run(PinnedResolver("h", ["10.0.0.1"]).resolve("h", 443, socket.AF_INET6))


# --------------------------------------------------------------------------
# post against local servers
# --------------------------------------------------------------------------


def test_post_200():
    async def go():
        async with Server(answer(200, b'{"ok":true}', {"X-Thing": "1"})) as s:
            r = await post_local(s.url("/hook?x=1"), b'{"a":1}', {"X-Casestream-Delivery-Id": "d-1"})
            return s, r
    s, r = run(go())
    assert r.status == 200 and r.error is None and not r.truncated
    assert r.body_prefix == b'{"ok":true}'
    assert r.header("X-Thing") == "1" and r.headers["x-thing"] == "1"
    assert r.addresses == ("127.0.0.1",)
    assert 0 <= r.elapsed < 2
    [req] = s.requests
    assert req["method"] == "POST" and req["path"] == "/hook?x=1" and req["body"] == b'{"a":1}'
    h = req["headers"]
    assert h["User-Agent"] == "casestream/1"
    assert h["Content-Type"] == "application/json"
    assert h["Accept-Encoding"] == "identity"
    assert h["X-Casestream-Delivery-Id"] == "d-1"
    assert h["Host"] == f"127.0.0.1:{s.port}"
    assert classify(r.status, r.error, r.header("retry-after"), time.time()).kind == DELIVERED


def test_post_caller_headers_win_and_managed_headers_refused():
    async def go():
        async with Server(answer()) as s:
            r = await post_local(s.url(), b"x=1", {"Content-Type": "text/plain", "User-Agent": "other/2"})
            with pytest.raises(ValueError, match="Host"):
                await post_local(s.url(), b"", {"Host": "evil.example"})
            return s, r
    s, r = run(go())
    assert r.status == 200
    assert len(s.requests) == 1
    assert s.requests[0]["headers"]["Content-Type"] == "text/plain"
    assert s.requests[0]["headers"]["User-Agent"] == "other/2"


def test_post_500_429_410():
    async def go():
        async with Server(answer(500, b"boom")) as a, Server(answer(429, b"slow down", {"Retry-After": "7"})) as b, \
                Server(answer(410, b"gone")) as c:
            return [await post_local(x.url()) for x in (a, b, c)]
    r500, r429, r410 = run(go())
    now = time.time()
    assert r500.status == 500 and r500.body_prefix == b"boom"
    assert classify(r500.status, r500.error, r500.header("Retry-After"), now).kind == RETRY
    assert r429.status == 429 and r429.header("Retry-After") == "7"
    o = classify(r429.status, r429.error, r429.header("Retry-After"), now)
    assert o.kind == RETRY and o.retry_at == now + 7
    assert r410.status == 410
    assert classify(r410.status, r410.error, None, now).kind == PERMANENT


def test_post_never_follows_redirects():
    async def go():
        async with Server(answer(200)) as target:
            async def redirect(request, server):
                raise web.HTTPFound(target.url("/stolen"))
            async with Server(redirect) as s:
                r = await post_local(s.url())
                return s, target, r
    s, target, r = run(go())
    assert r.status == 302 and r.header("Location").endswith("/stolen")
    assert len(s.requests) == 1
    assert target.requests == []
    assert classify(r.status, r.error, None, time.time()).kind == PERMANENT


def test_post_timeout():
    async def slow(request, server):
        await server.release.wait()
        return web.Response(text="late")

    async def go():
        async with Server(slow) as s:
            t0 = time.monotonic()
            r = await post_local(s.url(), timeout=0.3)
            return s, r, time.monotonic() - t0
    s, r, took = run(go())
    assert r.status is None and r.error.startswith("timeout")
    assert 0.25 <= took < 1.5 and r.elapsed < 1.5
    assert len(s.requests) == 1
    assert classify(r.status, r.error, None, time.time()).kind == RETRY


def test_post_timeout_while_reading_body_keeps_status():
    async def stall(request, server):
        resp = web.StreamResponse(status=200, headers={"Content-Length": "100"})
        await resp.prepare(request)
        await resp.write(b"partial")
        await server.release.wait()
        return resp

    async def go():
        async with Server(stall) as s:
            return await post_local(s.url(), timeout=0.3)
    r = run(go())
    assert r.status == 200 and r.error.startswith("timeout")
    assert classify(r.status, r.error, None, time.time()).kind == DELIVERED


def test_post_caps_the_response_body():
    huge = b"x" * (5 * 1024 * 1024)

    async def go():
        async with Server(answer(200, huge)) as s:
            small = await post_local(s.url(), max_response_bytes=1024)
            default = await post_local(s.url())
            exact = await post_local(s.url(), max_response_bytes=len(huge))
            return small, default, exact
    small, default, exact = run(go())
    assert small.status == 200 and small.body_prefix == b"x" * 1024 and small.truncated
    assert len(default.body_prefix) == 64 * 1024 and default.truncated
    assert len(exact.body_prefix) == len(huge) and not exact.truncated


def test_post_connection_refused():
    port = free_port()
    r = run(post_local(f"http://127.0.0.1:{port}/hook", timeout=2))
    assert r.status is None and r.error.startswith("connect:")
    assert r.elapsed < 1.5
    assert classify(r.status, r.error, None, time.time()).kind == RETRY


def test_post_dns_failure_is_a_value(fake_dns):
    r = run(post("https://nxdomain.example/hook", b"{}", {}))
    assert r.status is None and r.error.startswith("dns:")
    assert r.addresses == ()


# --------------------------------------------------------------------------
# SSRF: nothing is sent
# --------------------------------------------------------------------------


def test_loopback_refused_unless_allowlisted():
    async def go():
        async with Server(answer()) as s:
            with pytest.raises(Refused, match="loopback"):
                await post(s.url(), b"{}", {}, require_https=False)
            with pytest.raises(Refused, match="loopback"):
                await post(s.url(), b"{}", {}, require_https=False, allow=["10.0.0.0/8"])
            assert s.requests == []
            r = await post(s.url(), b"{}", {}, require_https=False, allow=["127.0.0.0/8"])
            return s, r
    s, r = run(go())
    assert r.status == 200 and len(s.requests) == 1


def test_localhost_name_refused_when_loopback_not_allowed():
    async def go():
        async with Server(answer()) as s:
            url = s.url(host="localhost")
            for allow in ([], ["10.0.0.0/8"], ["0.0.0.0/32"]):
                with pytest.raises(Refused, match="localhost resolves to"):
                    await post(url, b"{}", {}, require_https=False, allow=allow)
            assert s.requests == []
            r = await post(url, b"{}", {}, require_https=False, allow=["127.0.0.0/8", "::1"])
            return s, r
    s, r = run(go())
    assert r.status == 200
    assert [q["headers"]["Host"] for q in s.requests] == [f"localhost:{s.port}"]


@pytest.mark.parametrize("url", [
    "https://10.0.0.1/hook", "https://10.255.0.9:8443/hook", "https://169.254.169.254/latest/meta-data/",
    "https://[::1]/hook", "https://[::ffff:127.0.0.1]/hook", "https://100.64.0.10/hook", "https://[fd00:ec2::254]/",
    "https://0.0.0.0/", "https://127.1/", "https://2130706433/",
])
def test_forbidden_literals_refused(url):
    with pytest.raises(Refused):
        run(post(url, b"{}", {}))


def test_https_required_by_default(fake_dns):
    table, calls = fake_dns
    table["example.com"] = ["127.0.0.1"]

    async def go():
        async with Server(answer()) as s:
            url = f"http://example.com:{s.port}/hook"
            with pytest.raises(Refused, match="https required"):
                await post(url, b"{}", {}, allow=LOOPBACK)
            assert s.requests == [] and calls == []
            r = await post(url, b"{}", {}, allow=LOOPBACK, require_https=False)
            return s, r
    s, r = run(go())
    assert r.status == 200
    # pinned to the checked address, but the Host header is the URL's name
    assert s.requests[0]["headers"]["Host"] == f"example.com:{s.port}"


def test_hostname_resolving_to_a_forbidden_address_sends_nothing(fake_dns):
    table, _ = fake_dns
    table["sneaky.example"] = ["93.184.216.34", "127.0.0.1"]

    async def go():
        async with Server(answer()) as s:
            with pytest.raises(Refused, match="sneaky.example resolves to 127.0.0.1"):
                await post(f"http://sneaky.example:{s.port}/", b"{}", {}, require_https=False)
            return s
    assert run(go()).requests == []


def test_dns_rebinding_cannot_redirect_the_connection(fake_dns):
    """The first (checked) answer is 127.0.0.1, any later one 127.0.0.2: the
    request must reach the checked address and resolution happen once."""
    table, calls = fake_dns
    table["rebind.example"] = [["127.0.0.1"], ["127.0.0.2"]]

    async def go():
        async with Server(answer(200, b"A")) as a:
            try:
                b = Server(answer(200, b"B"), host="127.0.0.2", port=a.port)
                await b.__aenter__()
            except OSError:
                b = None
            try:
                r = await post(f"http://rebind.example:{a.port}/", b"{}", {}, require_https=False,
                               allow=["127.0.0.1/32", "127.0.0.2/32"])
            finally:
                if b is not None:
                    await b.__aexit__(None, None, None)
            return a, b, r
    a, b, r = run(go())
    assert r.status == 200 and r.body_prefix == b"A" and r.addresses == ("127.0.0.1",)
    assert calls == ["rebind.example"]
    assert len(a.requests) == 1
    if b is not None:
        assert b.requests == []


# --------------------------------------------------------------------------
# TLS: pinned to an IP, yet SNI and certificate checks use the host name
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl not available")
    d = tmp_path_factory.mktemp("certs")
    out = {}
    for name in ("hooks.example.test", "other.example.test"):
        key, crt = d / f"{name}.key", d / f"{name}.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", f"/CN={name}",
                        "-addext", f"subjectAltName=DNS:{name}"], check=True, capture_output=True)
        out[name] = (str(crt), str(key))
    return out


def _server_ctx(cert, sni_seen):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    ctx.sni_callback = lambda sock, name, c: sni_seen.append(name)
    return ctx


def test_tls_uses_the_hostname_for_sni_and_verification(certs, fake_dns):
    table, calls = fake_dns
    table["hooks.example.test"] = ["127.0.0.1"]
    sni: list = []
    client = ssl.create_default_context(cafile=certs["hooks.example.test"][0])

    async def go():
        async with Server(answer(200, b"tls ok"), ssl_context=_server_ctx(certs["hooks.example.test"], sni)) as s:
            r = await post(s.url(host="hooks.example.test"), b"{}", {}, allow=LOOPBACK, ssl_context=client)
            return s, r
    s, r = run(go())
    assert r.status == 200 and r.body_prefix == b"tls ok"
    assert sni == ["hooks.example.test"]
    assert s.requests[0]["headers"]["Host"] == f"hooks.example.test:{s.port}"
    assert calls == ["hooks.example.test"]


def test_tls_wrong_certificate_is_an_error_value(certs, fake_dns):
    table, _ = fake_dns
    table["hooks.example.test"] = ["127.0.0.1"]
    client = ssl.create_default_context(cafile=certs["other.example.test"][0])

    async def go():
        async with Server(answer(), ssl_context=_server_ctx(certs["other.example.test"], [])) as s:
            r = await post(s.url(host="hooks.example.test"), b"{}", {}, allow=LOOPBACK, ssl_context=client)
            return s, r
    s, r = run(go())
    assert r.status is None and r.error.startswith("tls:")
    assert s.requests == []
