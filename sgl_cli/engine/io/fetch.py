"""Fetching image URLs: bounded in time and size, checked, retried a little, and ahead of the model.

An image URL in the input is a fetch the user asked for; nothing else is fetched. Each fetch has a deadline for
the whole transfer (not only per read: a server that trickles bytes is cut off), a size cap (Content-Length is
checked first, then the bytes as they come), a content check (an image type, or bytes that open as an image), and
up to `retries` more tries after a connection error, a timeout or a 5xx answer (never after a 4xx). `Fetcher`
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
    enabled: bool = True  # False (`--no-fetch`): an item with an image URL is an error record
    timeout_s: float = 20.0  # the whole transfer, per try
    max_bytes: int = 50 << 20
    retries: int = 2
    workers: int = 8


class FetchError(Exception):
    """Why a URL gave no image (the item's error says it)."""


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The bytes at `url`, or FetchError saying why not."""
    last = ""
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(min(2.0, 0.25 * 2 ** attempt))
        try:
            return _fetch_once(url, policy)
        except _Retry as exc:
            last = str(exc)
    raise FetchError(f"{last} (after {policy.retries + 1} tries)")


class _Retry(FetchError):
    """A failure worth another try."""


def _fetch_once(url: str, policy: FetchPolicy) -> bytes:
    import socket
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + policy.timeout_s
    request = urllib.request.Request(url, headers={"User-Agent": "sgl", "Accept": "image/*"})
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
            kind = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError(f"{int(length):,} bytes, over the {policy.max_bytes >> 20} MiB limit")
            if kind and not kind.startswith("image/") and kind != "application/octet-stream":
                raise FetchError(f"the server sent {kind}, not an image")
            chunks, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise _Retry(f"timed out after {policy.timeout_s:g} s")
                chunk = response.read(1 << 16)
                if not chunk:
                    break
                size += len(chunk)
                if size > policy.max_bytes:
                    raise FetchError(f"more than the {policy.max_bytes >> 20} MiB limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except urllib.error.HTTPError as exc:
        message = f"HTTP {exc.code} {exc.reason}"
        raise (_Retry(message) if exc.code >= 500 else FetchError(message)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise _Retry(f"timed out after {policy.timeout_s:g} s") from None
        raise _Retry(f"cannot connect ({reason})") from None
    except (socket.timeout, TimeoutError):
        raise _Retry(f"timed out after {policy.timeout_s:g} s") from None
    except (ConnectionError, OSError) as exc:
        raise _Retry(f"connection failed ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:  # a malformed URL
        raise FetchError(str(exc)) from None


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
