"""Where the Wyoming listener listens, and its zeroconf announcement, so Home Assistant finds it by itself.

Wyoming has no authentication, so a server with API_KEY set listens for it on a LAN-facing HOST only when
WYOMING_WITHOUT_KEY says so (loopback otherwise, and the log says why). The announcement is
`_wyoming._tcp.local.` on the LAN address (Home Assistant's Wyoming integration browses for it), only when
the listener faces the LAN: a loopback listener has nobody to announce to.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Optional

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from serve_app.core.constants import LOGGER_NAME
from serve_app.core.settings import Settings

logger = logging.getLogger(LOGGER_NAME)

SERVICE_TYPE = "_wyoming._tcp.local."
ANY = ("0.0.0.0", "::", "")
MDNS_GROUP = "224.0.0.251"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def wyoming_host(settings: Settings) -> str:
    """HOST, or 127.0.0.1 where a key guards HTTP and nobody opted Wyoming (which has none) into the LAN."""
    if settings.api_key is not None and not is_loopback(settings.host) and not settings.wyoming_without_key:
        logger.warning(
            "wyoming: API_KEY is set and Wyoming has no key: its port listens on 127.0.0.1 only "
            "(WYOMING_WITHOUT_KEY=true lets the network use it without the key)"
        )
        return "127.0.0.1"
    return settings.host


def lan_address(host: str) -> Optional[str]:
    """The IPv4 address to announce for a listener on `host`: the address itself, or for every interface the
    one the system routes multicast DNS through (a UDP socket's choice; nothing is sent); None on loopback."""
    if is_loopback(host):
        return None
    if host not in ANY:
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((MDNS_GROUP, 5353))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if is_loopback(address) else address


def service_info(address: str, port: int, name: Optional[str] = None) -> AsyncServiceInfo:
    """The `_wyoming._tcp.local.` record for this server (Home Assistant reads the address and port)."""
    name = name or f"sesame-tts-{socket.gethostname().split('.')[0]}"
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(address)],
        port=port,
        properties={"program": "sesame-tts"},
    )


class Announcement:
    """The zeroconf registration while the listener runs; a failure (no multicast) is a warning, not a stop."""

    def __init__(self, info: AsyncServiceInfo):
        self.info = info
        self._zeroconf: Optional[AsyncZeroconf] = None

    async def start(self) -> None:
        address = socket.inet_ntoa(self.info.addresses[0])
        try:
            self._zeroconf = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
            await self._zeroconf.async_register_service(self.info)
            logger.info("wyoming: announced %s on %s:%d (zeroconf)", self.info.name, address, self.info.port)
        except Exception as exc:
            logger.warning("wyoming: not announced (zeroconf: %s); add it in Home Assistant by hand", exc)

    async def stop(self) -> None:
        if self._zeroconf is not None:
            try:
                await self._zeroconf.async_unregister_all_services()
                await self._zeroconf.async_close()
            except Exception as exc:
                logger.info("wyoming: zeroconf did not close cleanly: %s", exc)
