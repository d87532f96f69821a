"""Tell a healthchecks-style service (healthchecks.io, or a self-hosted Healthchecks) the verdict.

The URL is requested as is when all is well (OK or WARNING) and with ``/fail`` appended otherwise;
the check's one line goes along as the body, where such services show it. The service then also
notices when pings stop: a host that is down, or a timer that never fires.
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from urllib.parse import urlsplit, urlunsplit

from snapsync import __version__
from snapsync.errors import SnapsyncError, TransientError
from snapsync.retry import retrying


def ping_url(url: str, healthy: bool) -> str:
    """``/fail`` goes on the path, before any query string."""
    if healthy:
        return url
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/fail"))


def ping(url: str, healthy: bool, body: str, timeout: float) -> None:
    """Raise SnapsyncError with a line naming the host (never the URL: its path is the check's secret)."""
    where = urlsplit(url).netloc
    request = urllib.request.Request(
        ping_url(url, healthy), data=body.encode(), method="POST",
        headers={"User-Agent": f"snapsync/{__version__}", "Content-Type": "text/plain; charset=utf-8"},
    )
    try:
        for attempt in retrying(f"ping {where}"):
            with attempt:
                try:
                    with urllib.request.urlopen(request, timeout=timeout) as response:
                        response.read()
                except urllib.error.HTTPError as e:
                    if e.code == 429 or e.code >= 500:
                        raise TransientError(f"ping {where}: HTTP {e.code}") from None
                    raise SnapsyncError(f"ping {where}: HTTP {e.code} {e.reason}") from None
                except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                    reason = getattr(e, "reason", None) or f"{type(e).__name__}: {e}"
                    raise TransientError(f"ping {where}: {reason}") from None
                except ValueError as e:
                    raise SnapsyncError(f"ping {where}: {e}") from None
    except TransientError as e:
        raise SnapsyncError(str(e)) from None
