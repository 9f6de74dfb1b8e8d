"""UrlFetcher refuses internal addresses and odd schemes, pins DNS, and enforces redirect, size and time limits."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from serve_app.core.errors import BadRequest, PayloadTooLarge, UpstreamError, UrlNotAllowed
from serve_app.core.security import UrlFetcher, blocked_reason

RELEASE = threading.Event()  # lets the slow handler finish promptly at teardown


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {"Content-Length": str(len(body))}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        if path == "/ok":
            self._send(200, b"hello")
        elif path == "/host":
            self._send(200, self.headers["Host"].encode())
        elif path == "/redirect":
            self._send(302, headers={"Location": query, "Content-Length": "0"})
        elif path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            self._send(302, headers={"Location": f"/chain/{left - 1}" if left else "/ok", "Content-Length": "0"})
        elif path == "/big-declared":
            self._send(200, b"x" * 5000)
        elif path == "/big-stream":  # no Content-Length: HTTP/1.0 body runs until the connection closes
            self._send(200, b"x" * 200_000, headers={"Content-Type": "application/octet-stream"})
        elif path == "/slow":
            RELEASE.wait(5)
            self._send(200, b"late")
        else:
            self._send(404, b"not here")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RELEASE.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    RELEASE.set()
    httpd.shutdown()
    httpd.server_close()


def make_fetcher(allowlist: list[str] | None = None, timeout_s: float = 2.0, max_bytes: int = 1000) -> UrlFetcher:
    return UrlFetcher(allowlist=allowlist or [], timeout_s=timeout_s, max_bytes=max_bytes, max_redirects=3)


def run_async(fetcher: UrlFetcher, url: str) -> bytes:
    return asyncio.run(fetcher.fetch(url))


MODES = pytest.mark.parametrize("fetch", [run_async], ids=["async"])
Fetch = Callable[[UrlFetcher, str], bytes]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/", "loopback"),
        ("http://localhost:8080/img.png", "loopback"),
        ("http://2130706433/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://10.0.0.1/", "private"),
        ("http://192.168.1.20/", "private"),
        ("http://172.16.0.5/", "private"),
        ("http://[fc00::1]/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[fd00:ec2::254]/", "metadata"),
        ("http://[::ffff:169.254.169.254]/", "metadata"),
        ("http://169.254.10.10/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://100.64.0.1/", "shared"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
    ],
)
def test_internal_address_is_refused(url: str, reason: str) -> None:
    with pytest.raises(UrlNotAllowed) as info:
        run_async(make_fetcher(), url)
    err = info.value
    assert (err.status_code, err.code) == (400, "url_not_allowed")
    assert reason in err.message
    assert "private, loopback" in err.message and "SAM3_URL_ALLOWLIST" in err.message


def test_internal_address_is_refused_before_connecting() -> None:
    with pytest.raises(UrlNotAllowed, match="SAM3_URL_ALLOWLIST"):
        run_async(make_fetcher(), "http://10.1.2.3/image.png")


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://example.com/", "javascript:alert(1)"]
)
def test_non_http_scheme_is_refused(url: str) -> None:
    with pytest.raises(BadRequest) as info:
        run_async(make_fetcher(), url)
    assert not isinstance(info.value, UrlNotAllowed)
    assert "only http and https" in info.value.message


def test_url_without_scheme_is_refused() -> None:
    with pytest.raises(BadRequest, match="only http and https"):
        run_async(make_fetcher(), "example.com/cat.png")


def test_url_with_credentials_is_refused() -> None:
    with pytest.raises(BadRequest, match="credentials"):
        make_fetcher().check_url("http://user:secret@93.184.215.14/")


def test_public_address_passes_the_check() -> None:
    assert make_fetcher().check_url("https://93.184.215.14/a.png") == ipaddress.ip_address("93.184.215.14")


def test_cidr_allowlist_entry_permits_its_network_only() -> None:
    fetcher = make_fetcher(["10.0.0.0/8"])
    assert fetcher.check_url("http://10.20.30.40/") == ipaddress.ip_address("10.20.30.40")
    with pytest.raises(UrlNotAllowed):
        fetcher.check_url("http://192.168.0.1/")


def test_localhost_entry_permits_the_name_not_the_address() -> None:
    fetcher = make_fetcher(["localhost"])
    assert blocked_reason(fetcher.check_url("http://localhost/")) == "a loopback address"
    with pytest.raises(UrlNotAllowed):
        fetcher.check_url("http://127.0.0.1/")


def test_ipv6_allowlist_entry() -> None:
    assert make_fetcher(["::1"]).check_url("http://[::1]:9000/") == ipaddress.ip_address("::1")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("2002:7f00:1::", "a loopback address"),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a00:1", "a private address"),  # NAT64 wrapping 10.0.0.1
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_blocked_reason_sees_tunnelled_ipv4(address: str, reason: str | None) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) == reason


@MODES
def test_allowlisted_loopback_server_is_fetched(server: str, fetch: Fetch) -> None:
    assert fetch(make_fetcher(["127.0.0.1"]), f"{server}/ok") == b"hello"


@MODES
def test_redirect_within_allowlist_is_followed(server: str, fetch: Fetch) -> None:
    assert fetch(make_fetcher(["127.0.0.1"]), f"{server}/chain/2") == b"hello"


@MODES
def test_redirect_to_private_address_is_refused(server: str, fetch: Fetch) -> None:
    with pytest.raises(UrlNotAllowed, match="169.254.169.254.*metadata"):
        fetch(make_fetcher(["127.0.0.1"]), f"{server}/redirect?http://169.254.169.254/latest/meta-data/")


def test_redirect_to_other_loopback_address_is_refused(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    with pytest.raises(UrlNotAllowed, match="127.0.0.2"):
        run_async(make_fetcher(["127.0.0.1"]), f"{server}/redirect?http://127.0.0.2:{port}/ok")


def test_redirect_to_file_scheme_is_refused(server: str) -> None:
    with pytest.raises(BadRequest, match="only http and https"):
        run_async(make_fetcher(["127.0.0.1"]), f"{server}/redirect?file:///etc/passwd")


def test_too_many_redirects(server: str) -> None:
    with pytest.raises(UpstreamError, match="more than 3 redirects"):
        run_async(make_fetcher(["127.0.0.1"]), f"{server}/chain/5")


@MODES
@pytest.mark.parametrize("path", ["/big-declared", "/big-stream"])
def test_too_large_body_aborts(server: str, fetch: Fetch, path: str) -> None:
    with pytest.raises(PayloadTooLarge) as info:
        fetch(make_fetcher(["127.0.0.1"], max_bytes=1000), f"{server}{path}")
    assert info.value.status_code == 413
    assert "1000 bytes" in info.value.message and "SAM3_MAX_IMAGE_BYTES" in info.value.message


@MODES
def test_slow_server_times_out(server: str, fetch: Fetch) -> None:
    started = time.monotonic()
    with pytest.raises(UpstreamError, match=r"timed out after 0\.3 s"):
        fetch(make_fetcher(["127.0.0.1"], timeout_s=0.3), f"{server}/slow")
    assert time.monotonic() - started < 2.0


@MODES
def test_not_found_is_upstream_error(server: str, fetch: Fetch) -> None:
    with pytest.raises(UpstreamError) as info:
        fetch(make_fetcher(["127.0.0.1"]), f"{server}/missing.png")
    assert info.value.message == f"fetching {server}/missing.png failed: HTTP 404"
    assert (info.value.status_code, info.value.code) == (400, "fetch_failed")


def test_connection_refused_is_upstream_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamError, match="could not connect"):
        run_async(make_fetcher(["127.0.0.1"]), f"http://127.0.0.1:{port}/")


@MODES
def test_resolved_address_is_pinned_and_host_header_kept(
    server: str, fetch: Fetch, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo
    asked: list[str] = []

    def fake_getaddrinfo(host: str, *args: object, **kwargs: object) -> list:
        asked.append(host)
        return real("127.0.0.1" if host == "images.example.test" else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    port = server.rsplit(":", 1)[1]
    body = fetch(make_fetcher(["images.example.test"]), f"http://images.example.test:{port}/host")
    assert body == f"images.example.test:{port}".encode()
    assert asked.count("images.example.test") == 1  # the HTTP client never resolved the name again
