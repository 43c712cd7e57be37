"""mDNS discovery with python-zeroconf: advertise ``_chorus._tcp.local.`` and browse for peers.

The TXT record carries the federation name, node id, API version and port, never a secret.
Seeing a peer on mDNS only makes it a candidate: it becomes a member after a signed hello both
ways (:mod:`chorus_p2p.node.cluster`). Liveness comes from heartbeats, not from mDNS TTLs; the
goodbye packet on shutdown just makes peers notice sooner.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger("chorus_p2p.discovery")

SERVICE_TYPE = "_chorus._tcp.local."
API_VERSION = "1"

# The browser reports a service once (Added), so a resolution that gave up would lose that peer
# until something else found it again. On a loaded machine or a lossy link the answer can miss
# 3 s; ask again, a bounded number of times, ~30 s in all.
RESOLVE_TIMEOUT_MS = 3000
RESOLVE_RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)


class Discovery:
    def __init__(self, federation: str, node_id: str, port: int, interfaces: list[str] | None,
                 on_peer: Callable[[str, str], None], tls: bool = False):
        """``interfaces``: IP addresses to bind (None: all); ``on_peer(node_id, url)``."""
        self.federation = federation
        self.node_id = node_id
        self.port = port
        self.interfaces = interfaces
        self.on_peer = on_peer
        self.tls = tls
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._tasks: set[asyncio.Task] = set()
        self._resolving: set[str] = set()

    def _addresses(self) -> list[bytes]:
        if self.interfaces:
            return [socket.inet_aton(ip) for ip in self.interfaces if ":" not in ip]
        return []  # zeroconf fills in every interface's address

    async def start(self) -> None:
        # InterfaceChoice.All, never the string "all": zeroconf >= 0.132 refuses strings, and
        # this is the path every lab machine runs (no --interface).
        self._zc = AsyncZeroconf(interfaces=list(self.interfaces) if self.interfaces
                                 else InterfaceChoice.All, ip_version=IPVersion.V4Only)
        name = f"chorus-{self.node_id[:16]}.{SERVICE_TYPE}"
        kwargs = {"addresses": self._addresses()} if self.interfaces else {
            "parsed_addresses": local_ipv4_addresses() or ["127.0.0.1"]}
        self._info = AsyncServiceInfo(
            SERVICE_TYPE, name, port=self.port, server=f"chorus-{self.node_id[:16]}.local.",
            properties={"federation": self.federation, "node_id": self.node_id,
                        "api": API_VERSION, "port": str(self.port),
                        "tls": "1" if self.tls else "0"}, **kwargs)
        await self._zc.async_register_service(self._info)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_change])
        log.info("mDNS: advertising %s on %s", name, ", ".join(self.interfaces or ["all"]))

    async def refresh(self) -> None:
        """Browse again from scratch: a new browser queries at once, so a peer that a down
        link hid (its announcements and our early queries lost) is found within seconds."""
        if self._zc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE,
                                            handlers=[self._on_change])

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        if name in self._resolving:  # an update while we still ask: the retries cover it
            return
        self._resolving.add(name)
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._resolving.discard(name))

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        for attempt, delay in enumerate((*RESOLVE_RETRY_DELAYS_S, None), start=1):
            if self._zc is None:
                return
            if await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
                break
            if delay is None:
                log.warning("mDNS: %s did not answer in %d tries; it is found again when it "
                            "re-announces or this node browses anew", name, attempt)
                return
            log.debug("mDNS: no answer from %s (try %d), asking again in %.0f s", name,
                      attempt, delay)
            await asyncio.sleep(delay)
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        if props.get("federation") != self.federation or props.get("node_id") == self.node_id:
            return
        scheme = "https" if props.get("tls") == "1" else "http"
        for address in info.parsed_addresses(IPVersion.V4Only):
            self.on_peer(props.get("node_id", ""), f"{scheme}://{address}:{info.port}")

    async def stop(self) -> None:
        """Unregister (mDNS goodbye) and close the sockets."""
        for task in list(self._tasks):
            task.cancel()
        if self._zc is None:
            return
        try:
            if self._browser is not None:
                await self._browser.async_cancel()
            if self._info is not None:
                await self._zc.async_unregister_service(self._info)
        finally:
            await self._zc.async_close()
            self._zc = None


def local_ipv4_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this host, for the advertisement on all interfaces."""
    from zeroconf import get_all_addresses

    return [a for a in get_all_addresses() if not a.startswith("127.")]
