"""Completion webhooks: one POST to the batch's ``webhook_url``, refused for internal addresses.

Best effort today: sent once, after the completion commits; a receiver that is down misses it
(the batch's status stays readable in the API).
"""
from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)


def post_webhook(url: str, message: dict[str, Any], *, timeout: float, allow_private: bool = False) -> bool:
    """Best effort: a slow or failing receiver never fails the task; the batch status stays in the API."""
    try:
        if not allow_private:
            refuse_internal_address(url)
        response = httpx.post(url, json=message, timeout=timeout, follow_redirects=False)
        response.raise_for_status()
    except Exception as error:  # any failure of someone else's server is only logged
        log.warning("webhook %s for batch %s failed: %s", url, message.get("batch_id"), error)
        return False
    return True


class InternalAddressRefused(ValueError):
    pass


def refuse_internal_address(url: str) -> None:
    """Raise when the URL's host resolves to a loopback, private, link-local or reserved address.

    Checked just before the POST (redirects are not followed); a host whose DNS answer changes
    between this check and the connection is not caught: front the workers with an egress proxy
    where that matters."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as error:
        raise InternalAddressRefused(f"cannot resolve {host!r}: {error}") from None
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global:
            raise InternalAddressRefused(f"{host} resolves to {ip}, an internal address (WEBHOOK_ALLOW_PRIVATE)")
