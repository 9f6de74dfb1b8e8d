"""SSRF-safe fetching of client-supplied URLs: scheme, address, redirect, time and size checks on every hop."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from serve_app.core.errors import BadRequest, PayloadTooLarge, UpstreamError, UrlNotAllowed

if TYPE_CHECKING:
    from serve_app.core.config import Config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HEADERS = {"Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity", "User-Agent": "sam3-serve"}
_ALLOWLIST_KNOB = "SAM3_URL_ALLOWLIST"


def _short(url: object, limit: int = 200) -> str:
    text = str(url)
    return text if len(text) <= limit else text[:limit] + "..."


def _embedded(address: IPAddress) -> list[IPAddress]:
    """The address itself plus any IPv4 address tunnelled inside an IPv6 one (mapped, 6to4, Teredo, NAT64)."""
    found: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            found.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            found.append(address.sixtofour)
        if address.teredo is not None:
            found.extend(address.teredo)
        if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
            found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _single_reason(address: IPAddress) -> str | None:
    if address in _METADATA:
        return "the cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if address.is_private or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
        return "a private address"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "a non-public address"
    return None


def blocked_reason(address: IPAddress) -> str | None:
    """Why an address must not be fetched (e.g. "a loopback address"), or None when it is public."""
    for candidate in reversed(_embedded(address)):  # a tunnelled IPv4 address names the real target best
        reason = _single_reason(candidate)
        if reason is not None:
            return reason
    return None


@dataclass(frozen=True)
class Allowlist:
    """Host names and networks that may be fetched even though they resolve to internal addresses."""

    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        """Entries are host names (exact match), IPs or CIDRs; blanks are ignored."""
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".").strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks))

    def permits(self, host: str, address: IPAddress) -> bool:
        if host.lower().rstrip(".") in self.hosts:
            return True
        return any(candidate in network for candidate in _embedded(address) for network in self.networks)


@dataclass(frozen=True)
class _Hop:
    """One checked request: the URL as asked for, and the same URL pinned to the address that was checked."""

    url: httpx.URL
    pinned_url: httpx.URL
    headers: dict[str, str]
    extensions: dict[str, str]


def parse_url(url: str) -> httpx.URL:
    """Parse a client URL, accepting only absolute http(s) URLs without credentials; raises BadRequest."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise BadRequest(f"invalid URL {_short(url)!r}: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        scheme = parsed.scheme or "(none)"
        raise BadRequest(
            f"unsupported URL scheme {_short(scheme, 20)!r} in {_short(url)!r}: only http and https URLs can be fetched"
        )
    if not parsed.raw_host:
        raise BadRequest(f"invalid URL {_short(url)!r}: it has no host")
    if parsed.userinfo:
        raise BadRequest(f"invalid URL {_short(url)!r}: URLs with credentials (user:password@) are not accepted")
    return parsed.copy_with(fragment=None)


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UpstreamError(f"could not resolve host {_short(host, 100)!r}: {exc}") from None
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UpstreamError(f"could not resolve host {_short(host, 100)!r}: no IPv4 or IPv6 address")
    return addresses


def _host_and_port(url: httpx.URL) -> tuple[str, int]:
    return url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80)


class UrlFetcher:
    """Fetches http(s) URLs, refusing internal addresses (unless allow-listed) on every redirect hop."""

    def __init__(self, allowlist: list[str], timeout_s: float, max_bytes: int, max_redirects: int) -> None:
        self.allowlist = Allowlist.parse(allowlist)
        self.timeout_s = float(timeout_s)
        self.max_bytes = int(max_bytes)
        self.max_redirects = int(max_redirects)

    @classmethod
    def from_config(cls, config: Config) -> UrlFetcher:
        return cls(
            allowlist=list(config.url_allowlist),
            timeout_s=config.fetch_timeout_s,
            max_bytes=config.max_image_bytes,
            max_redirects=config.fetch_max_redirects,
        )

    def check_url(self, url: str) -> IPAddress:
        """Parse and resolve a URL and return the address it would be fetched from; raises if it is refused."""
        parsed = parse_url(url)
        return self._check(parsed, _resolve(*_host_and_port(parsed)))

    def _check(self, url: httpx.URL, addresses: list[IPAddress]) -> IPAddress:
        host = url.raw_host.decode("ascii")
        for address in addresses:
            reason = blocked_reason(address)
            if reason is not None and not self.allowlist.permits(host, address):
                raise UrlNotAllowed(
                    f"refusing to fetch {_short(url)}: host {_short(host, 100)!r} resolves to {address}, {reason} "
                    f"(private, loopback and other internal addresses are not fetched); an operator can allow it "
                    f"by adding the host or address to {_ALLOWLIST_KNOB}",
                    details={"url": _short(url), "address": str(address), "reason": reason},
                )
        return addresses[0]

    def _pin(self, url: httpx.URL, address: IPAddress) -> _Hop:
        host = url.raw_host.decode("ascii")
        headers = dict(_HEADERS, Host=url.netloc.decode("ascii"))
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        return _Hop(url, url.copy_with(host=str(address)), headers, extensions)

    def _next_url(self, hop: _Hop, response: httpx.Response, redirects: int) -> httpx.URL | None:
        """None when the response body is the answer; the next URL for a redirect; raises otherwise."""
        status = response.status_code
        if 200 <= status < 300:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large(hop.url, f"the server declares {int(declared)} bytes,")
            return None
        if status not in _REDIRECTS:
            raise UpstreamError(f"fetching {_short(hop.url)} failed: HTTP {status}", details={"status": status})
        location = response.headers.get("location")
        if not location:
            raise UpstreamError(f"fetching {_short(hop.url)} failed: HTTP {status} redirect without a Location header")
        if redirects >= self.max_redirects:
            raise UpstreamError(
                f"fetching {_short(hop.url)} failed: more than {self.max_redirects} redirects "
                f"(SAM3_FETCH_MAX_REDIRECTS)"
            )
        try:
            target = hop.url.join(location)
        except (httpx.InvalidURL, ValueError) as exc:
            raise UpstreamError(f"fetching {_short(hop.url)} failed: invalid redirect location: {exc}") from None
        return parse_url(str(target))

    def _append(self, body: bytearray, chunk: bytes, url: httpx.URL) -> None:
        body.extend(chunk)
        if len(body) > self.max_bytes:
            raise self._too_large(url, "the body is")

    def _too_large(self, url: httpx.URL, why: str) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"fetching {_short(url)} aborted: {why} more than the limit of {self.max_bytes} bytes "
            "(SAM3_MAX_IMAGE_BYTES)"
        )

    def _timed_out(self, url: str) -> UpstreamError:
        return UpstreamError(f"fetching {_short(url)} timed out after {self.timeout_s:g} s (SAM3_FETCH_TIMEOUT_S)")

    @staticmethod
    def _failed(url: str, exc: httpx.HTTPError) -> UpstreamError:
        what = "could not connect" if isinstance(exc, httpx.ConnectError) else "the transfer failed"
        return UpstreamError(f"fetching {_short(url)} failed: {what} ({type(exc).__name__}: {exc})")

    async def fetch(self, url: str) -> bytes:
        """Fetch a URL's body; the whole exchange, redirects included, must finish within timeout_s."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch_async(url)
        except (TimeoutError, httpx.TimeoutException):
            raise self._timed_out(url) from None
        except httpx.HTTPError as exc:
            raise self._failed(url, exc) from None

    async def _fetch_async(self, url: str) -> bytes:
        current: httpx.URL | None = parse_url(url)
        async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=self.timeout_s) as client:
            for redirects in range(self.max_redirects + 1):
                assert current is not None
                addresses = await asyncio.to_thread(_resolve, *_host_and_port(current))
                hop = self._pin(current, self._check(current, addresses))
                request = client.build_request("GET", hop.pinned_url, headers=hop.headers, extensions=hop.extensions)
                response = await client.send(request, stream=True)
                try:
                    current = self._next_url(hop, response, redirects)
                    if current is None:
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            self._append(body, chunk, hop.url)
                        return bytes(body)
                finally:
                    await response.aclose()
        raise AssertionError("unreachable: _next_url raises once max_redirects is reached")
