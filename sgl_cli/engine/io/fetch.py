"""Fetching image URLs: bounded in time and size, checked, retried a little, and ahead of the model.

An image URL in the input is a fetch the user asked for; nothing else is fetched. Each try has a deadline for
the whole transfer, connecting and redirects included (not only per read: a server that trickles bytes is cut
off at the deadline), a size cap (Content-Length is checked first, then the bytes as they come), a content check
(an image type, or bytes that open as an image), and up to `retries` more tries after a connection error, a
timeout or a 5xx answer (never after a 4xx): a whole fetch ends within `FetchPolicy.limit_s`. Redirects stay on
http and https, at most `max_redirects`. `Fetcher`
runs fetches in a small thread pool; `Engine.run` submits the URLs of the items ahead of the batch it computes,
so a slow server does not leave the accelerator idle.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class FetchPolicy:
    """What one fetch may cost. Each try ends within `timeout_s`, however the server behaves (connecting, every
    redirect, headers and bytes however slowly they come); there are at most `retries` more tries, after the
    pauses `pause_s(n)`; so a whole fetch ends within `limit_s` (62 s by default), never more."""

    enabled: bool = True  # False (`--no-fetch`): an item with an image URL is an error record
    timeout_s: float = 20.0  # one try, from connecting to the last byte (redirects included)
    max_bytes: int = 50 << 20
    retries: int = 2
    workers: int = 8
    max_redirects: int = 10

    @staticmethod
    def pause_s(attempt: int) -> float:
        """The pause before try `attempt` (1 for the first retry)."""
        return min(2.0, 0.25 * 2 ** attempt)

    @property
    def limit_s(self) -> float:
        """The longest a whole fetch can take: every try's `timeout_s` and the pauses between them."""
        return self.timeout_s * (self.retries + 1) + sum(self.pause_s(n) for n in range(1, self.retries + 1))


class FetchError(Exception):
    """Why a URL gave no image (the item's error says it)."""


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The bytes at `url`, or FetchError saying why not (within `policy.limit_s`)."""
    last = ""
    tries = policy.retries + 1
    for attempt in range(tries):
        if attempt:
            time.sleep(policy.pause_s(attempt))
        try:
            return _fetch_once(url, policy)
        except _Retry as exc:
            last = str(exc)
    raise FetchError(f"{last} (after {tries} {'try' if tries == 1 else 'tries'})")


class _Retry(FetchError):
    """A failure worth another try."""


class _Deadline:
    """One try's deadline. Socket timeouts alone cannot bound a try (a server that sends a byte now and then
    never lets a read time out), so at the deadline every connection of the try is shut down from a timer
    thread: whatever read is blocked then returns at once."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._socks: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if self.expired or self.remaining() <= 0:
            raise _Retry(f"timed out after {self.seconds:g} s")

    def watch(self, sock) -> None:
        """Shut `sock`'s connection down at the deadline (through a duplicate: TLS takes the socket over)."""
        dup = sock.dup()
        with self._lock:
            self._socks.append(dup)
            expired = self.expired
        if expired:
            self._shut(dup)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for s in socks:
            self._shut(s)

    @staticmethod
    def _shut(sock) -> None:
        import socket

        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            s.close()


def _opener(deadline: _Deadline, policy: FetchPolicy):
    """A urllib opener whose connections `deadline` watches, whose redirects stay on http(s), at most
    `policy.max_redirects` of them."""
    import http.client
    import socket
    import urllib.request
    from urllib.parse import urlparse

    def connection(base):
        class Watched(base):
            def __init__(self, *args, **kwargs):
                kwargs["timeout"] = max(0.01, deadline.remaining())
                super().__init__(*args, **kwargs)
                self._create_connection = self._connect_watched

            def _connect_watched(self, address, timeout=None, source_address=None):
                deadline.check()
                sock = socket.create_connection(address, max(0.01, deadline.remaining()), source_address)
                deadline.watch(sock)
                return sock

        return Watched

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(connection(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(connection(http.client.HTTPSConnection), req, context=self._context)

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = policy.max_redirects
        inf_msg = _LOOP  # urllib's own text holds two newlines

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            scheme = urlparse(newurl).scheme.lower()
            if scheme not in ("http", "https"):
                raise FetchError(f"the server redirected to a {scheme or 'relative'} URL ({_short(newurl)}); sgl "
                                 "fetches http and https only")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(HTTP, HTTPS, Redirects)


_LOOP = "sgl: a redirect loop: "


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fetch_once(url: str, policy: FetchPolicy) -> bytes:
    import http.client
    import socket
    import urllib.error
    import urllib.request

    deadline = _Deadline(policy.timeout_s)
    request = urllib.request.Request(url, headers={"User-Agent": "sgl", "Accept": "image/*"})
    try:
        with _opener(deadline, policy).open(request, timeout=policy.timeout_s) as response:
            kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError(f"{int(length):,} bytes, over the {policy.max_bytes >> 20} MiB limit")
            if kind and not kind.startswith("image/") and kind != "application/octet-stream":
                raise FetchError(f"the server sent {_short(kind, 60)}, not an image")
            chunks, size = [], 0
            while True:
                deadline.check()
                chunk = response.read1(1 << 16)  # what has come, not a full 64 KiB
                if not chunk:
                    break
                size += len(chunk)
                if size > policy.max_bytes:
                    raise FetchError(f"more than the {policy.max_bytes >> 20} MiB limit")
                chunks.append(chunk)
            deadline.check()  # an end that the deadline's shutdown caused is no end
            if response.length:  # bytes the server announced and did not send
                raise _Retry(f"the server closed the connection after {size:,} of {size + response.length:,} bytes")
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        deadline.check()
        if 300 <= exc.code < 400:
            if str(exc.reason).startswith(_LOOP):
                raise FetchError(f"too many redirects (over {policy.max_redirects}) or a redirect loop") from None
            raise FetchError(f"HTTP {exc.code} {_short(exc.reason, 60)} without a Location to follow") from None
        message = f"HTTP {exc.code} {_short(exc.reason, 60)}"
        raise (_Retry(message) if exc.code >= 500 else FetchError(message)) from None
    except urllib.error.URLError as exc:
        deadline.check()
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _Retry(f"timed out after {policy.timeout_s:g} s") from None
        raise _Retry(f"cannot connect ({_short(reason, 120)})") from None
    except (socket.timeout, TimeoutError):
        raise _Retry(f"timed out after {policy.timeout_s:g} s") from None
    except (ConnectionError, OSError, http.client.HTTPException) as exc:
        deadline.check()
        raise _Retry(f"connection failed ({type(exc).__name__}: {_short(exc, 120)})") from None
    except ValueError as exc:  # a malformed URL
        raise FetchError(_short(exc, 200)) from None
    finally:
        deadline.close()


class Fetcher:
    """A pool of fetches. `submit(url)` says an item will want the URL (one fetch per URL however many items want
    it); `get(url)` waits for it, and the bytes are dropped once every item that wanted them has had them.
    Thread-safe; `close` stops the pool."""

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future] = {}
        self._wanted: dict[str, int] = {}
        self._lock = threading.Lock()

    def submit(self, url: str) -> None:
        if not self.policy.enabled:
            return
        with self._lock:
            self._wanted[url] = self._wanted.get(url, 0) + 1
            if url not in self._futures:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.policy.workers, thread_name_prefix="sgl-fetch")
                self._futures[url] = self._pool.submit(fetch, url, self.policy)

    def get(self, url: str) -> bytes:
        """The URL's bytes (fetched now if nobody submitted it), or FetchError."""
        if not self.policy.enabled:
            raise FetchError("fetching URLs is off (--no-fetch)")
        with self._lock:
            submitted = url in self._futures
        if not submitted:
            self.submit(url)
        with self._lock:
            future = self._futures[url]
        try:
            return future.result()
        finally:
            with self._lock:
                self._wanted[url] = self._wanted.get(url, 1) - 1
                if self._wanted[url] <= 0:
                    self._wanted.pop(url, None)
                    self._futures.pop(url, None)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            futures, self._futures = self._futures, {}
        for f in futures.values():
            f.cancel()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
