"""uvicorn's HTTP protocol with one send per response: the service's small JSON answers leave as one TCP segment.

uvicorn writes a response's status line and headers (``http.response.start``) to the socket at once, then the
body (``http.response.body``) with a second ``send``: two syscalls and two segments per answer, so a client
waiting for the answer is woken for the head and again for the body. :func:`http_protocol` returns uvicorn's
own protocol class (httptools, else h11) whose transport joins the writes made during one event-loop step into
one ``writelines`` at the end of that step; ``close`` / ``write_eof`` flush first, so nothing is reordered or
lost. Everything else (parsing, limits, keep-alive, flow control) is uvicorn's.

    uvicorn.run(app, http=http_protocol())      # or uvicorn.Config(app, http=http_protocol())
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional


class CoalescingTransport:
    """A transport whose ``write`` calls made during one event-loop step go out as one ``writelines`` (one
    ``send``/``writev``) at the end of that step. Any other attribute is the wrapped transport's."""

    __slots__ = ("_transport", "_loop", "_parts")

    def __init__(self, transport: asyncio.Transport, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        self._transport = transport
        self._loop = loop or asyncio.get_running_loop()
        self._parts: list = []

    def write(self, data: Any) -> None:
        if not data:
            return
        if not self._parts:
            self._loop.call_soon(self.flush)
        self._parts.append(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Send what was written so far (dropped if the connection is closing: it could not be sent)."""
        parts, self._parts = self._parts, []
        if parts and not self._transport.is_closing():
            if len(parts) == 1:
                self._transport.write(parts[0])
            else:
                self._transport.writelines(parts)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._parts = []
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(p) for p in self._parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


_PROTOCOLS: dict = {}


def http_protocol(base: Optional[type] = None) -> type:
    """uvicorn's HTTP protocol class (``base``; default: its ``auto`` choice, httptools when installed, else h11)
    with a :class:`CoalescingTransport`: pass it as ``uvicorn.Config(http=...)``."""
    if base is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        base = AutoHTTPProtocol
    cls = _PROTOCOLS.get(base)
    if cls is None:
        class CoalescingHTTPProtocol(base):  # type: ignore[misc, valid-type]
            def connection_made(self, transport) -> None:  # type: ignore[override]
                super().connection_made(CoalescingTransport(transport))

        CoalescingHTTPProtocol.__name__ = CoalescingHTTPProtocol.__qualname__ = f"Coalescing{base.__name__}"
        cls = _PROTOCOLS[base] = CoalescingHTTPProtocol
    return cls
