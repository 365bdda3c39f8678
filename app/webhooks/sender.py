"""One delivery attempt over HTTP(S), to an address that was checked, with no redirects.

The request goes to the checked IP address itself; the `Host` header and the TLS server name (SNI and
certificate check) carry the URL's host name. So the name is never resolved again after the check.
"""

from __future__ import annotations

import httpx

from app.webhooks.outbox import Outcome
from app.webhooks.urls import Target

EXCERPT_BYTES = 256
USER_AGENT = "must-webhooks/1"


def post(target: Target, headers: dict[str, str], body: str, timeout_seconds: float) -> Outcome:
    """POST `body` to the target's first address; any answer but a 2xx is a failed attempt."""
    url = httpx.URL(target.url.url)
    address = target.addresses[0]
    pinned = url.copy_with(host=str(address))
    extensions = {"sni_hostname": target.url.host} if target.url.scheme == "https" else {}
    timeout = httpx.Timeout(timeout_seconds, connect=min(timeout_seconds, 5.0))
    request_headers = {
        **headers,
        "host": url.netloc.decode(),
        "content-type": "application/json",
        "accept-encoding": "identity",
        "user-agent": USER_AGENT,
    }
    # trust_env=False: a proxy from the environment would resolve the name itself and defeat the check.
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        try:
            with client.stream(
                "POST", pinned, content=body.encode(), headers=request_headers, extensions=extensions
            ) as response:
                excerpt = _excerpt(response)
        except httpx.TimeoutException as exc:
            return Outcome(error_code="timeout", error_message=f"no answer in time: {type(exc).__name__}")
        except httpx.ConnectError as exc:
            return Outcome(error_code="connection_failed", error_message=str(exc) or type(exc).__name__)
        except httpx.HTTPError as exc:
            return Outcome(error_code="request_failed", error_message=f"{type(exc).__name__}: {exc}")
    status = response.status_code
    if 200 <= status < 300:
        return Outcome(status_code=status, response_excerpt=excerpt)
    if response.is_redirect:
        location = response.headers.get("location", "")[:200]
        return Outcome(
            status_code=status,
            error_code="redirect_not_followed",
            error_message=f"redirects are not followed (to {location!r})",
            response_excerpt=excerpt,
        )
    return Outcome(
        status_code=status, error_code="http_error", error_message=f"answered {status}", response_excerpt=excerpt
    )


def _excerpt(response: httpx.Response) -> str | None:
    """The first bytes of the answer, decoded; the rest is not even read."""
    taken = b""
    for chunk in response.iter_raw():
        taken += chunk
        if len(taken) >= EXCERPT_BYTES:
            break
    return taken[:EXCERPT_BYTES].decode("utf-8", errors="replace") or None
