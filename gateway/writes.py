"""Socket writes of one event-loop pass, sent together when the pass ends.

A proxy writes twice per request: the request to the backend, the answer to the client.
Written at once, every write can land while the process reading that socket (the model
server, the client) has gone idle, and the kernel has to wake it: on a VM that is an
interrupt to another virtual CPU, which costs the writer 10-20 us each time, more than
the write itself. Held until the pass ends and then written one after the other, the
writes of a busy pass wake each reader about once. This is Netty's flush consolidation,
done per event-loop pass.

The pass's *first* write still goes out at once. Held, the only write of a quiet pass
would leave just before the loop goes to sleep, and on a VM the answer would then have
to wake a halted CPU: at one connection that added 20 us per write to the latency.

Measured on a 2-vCPU VM, split + traces, paired against the same code writing at once:
+12 % requests/s (holding every write, the first too: +18 %, and +40 us at one
connection; bench/README.md, "What the hot path does").

What a caller sees is the same as writing at once, a little later:

- each connection's bytes go out in the order they were written;
- ``close()`` sends what is held first, as a transport closes after its buffer drains;
  ``abort()`` drops it, as a transport does;
- a connection holding more than ``FLUSH_BYTES`` writes at once, so a large body is
  never held in memory beside the transport's own buffer and back-pressure still works.

A streamed answer's chunks bypass the batch (``forward._relay_chunked`` writes them to
the socket's transport, after flushing what is held): one chunk per connection per pass
gains nothing from being held.

Not supported: ``loop.sendfile()`` on a wrapped transport (asyncio's refuses it, which
aiohttp's FileResponse does not fall back from). The proxy listener serves no files.

Only bytes are ever held (a caller may reuse a bytearray after ``write()`` returns).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger("gateway.writes")

# Past this many bytes held for one connection, it writes at once.
FLUSH_BYTES = 64 * 1024


class WriteBatch:
    """The connections holding writes in the current pass of one event loop."""

    __slots__ = ("_held", "_loop", "_passing")

    def __init__(self) -> None:
        self._held: list[BatchedTransport] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._passing = False  # a write went out in this pass: later ones are held

    def wrap(self, transport: asyncio.Transport) -> BatchedTransport:
        """``transport`` with its writes held until the end of the pass."""
        if self._loop is None:
            # Once, not per write: on Python 3.11 get_running_loop() makes a system call.
            self._loop = asyncio.get_running_loop()
        return BatchedTransport(transport, self)

    def _first_write(self) -> bool:
        """Whether a write is the pass's first, to be sent at once (and opens the pass)."""
        if self._passing:
            return False
        self._passing = True
        assert self._loop is not None
        self._loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Send everything held now and end the pass (at its end, or when shutting down)."""
        self._passing = False
        held, self._held = self._held, []
        for transport in held:
            transport.flush()  # never raises: one bad connection must not strand the rest


class BatchedTransport(asyncio.Transport):
    """An ``asyncio.Transport`` whose writes wait in a :class:`WriteBatch`.

    Everything but writing and closing is the wrapped transport's own. (A subclass, so
    that code typed for transports takes it; every method is defined here, since the
    base class's only raise NotImplementedError.)"""

    __slots__ = ("_batch", "_chunks", "_held_bytes", "transport")

    def __init__(self, transport: asyncio.Transport, batch: WriteBatch) -> None:
        super().__init__()
        self.transport = transport
        self._batch = batch
        self._chunks: list[bytes] = []
        self._held_bytes = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        chunk = data if type(data) is bytes else bytes(data)
        if not self._chunks:
            batch = self._batch
            if batch._first_write():
                # Nothing else is held yet: sent at once, this wakes its reader no
                # sooner than need be, and a pass with one write (light load) adds no
                # delay to it. (Held, it would leave just before the loop sleeps, and
                # on a VM the answer then has to wake a halted CPU: +20 us a write.)
                self.transport.write(chunk)
                return
            batch._held.append(self)
        self._chunks.append(chunk)
        self._held_bytes += len(chunk)
        if self._held_bytes > FLUSH_BYTES:
            self.flush()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Hand what is held to the transport (a no-op when nothing is held)."""
        chunks = self._chunks
        if not chunks:
            return
        self._chunks = []
        self._held_bytes = 0
        transport = self.transport
        if transport.is_closing():
            return  # the peer went away first: nothing can be delivered
        try:
            if len(chunks) == 1:
                transport.write(chunks[0])
            else:
                transport.writelines(chunks)
        except (RuntimeError, OSError) as error:  # closed under us: as a lost write
            log.debug("held write dropped: %s", error)
        except Exception:
            # Bytes are lost whatever happened: end the connection so that its peer sees
            # a reset, not an answer that never finishes.
            log.exception("held write failed; aborting the connection")
            transport.abort()

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._chunks = []
        self._held_bytes = 0
        self.transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + self._held_bytes

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.transport.get_protocol()


class BatchedServer(web.Server):
    """aiohttp's low-level server with every connection's writes held in ``writes``."""

    def __init__(self, handler: Any, *, writes: WriteBatch, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        # __call__ builds handlers from web.Server's own _loop and _kwargs: fail at start,
        # not on every connection, should an aiohttp release stop keeping them.
        if not hasattr(self, "_loop") or not isinstance(getattr(self, "_kwargs", None), dict):
            raise RuntimeError(
                "this aiohttp's web.Server keeps no _loop/_kwargs; install a version this "
                "gateway supports (see pyproject.toml)"
            )
        self.writes = writes

    def __call__(self) -> RequestHandler:
        # As web.Server.__call__ does (its _loop and _kwargs), with our handler class.
        return _BatchedRequestHandler(self, loop=self._loop, **self._kwargs)


class _BatchedRequestHandler(RequestHandler):
    __slots__ = ("on_lost",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.on_lost: Callable[[], None] | None = None
        server = cast(BatchedServer, self._manager)
        super().connection_made(server.writes.wrap(cast(asyncio.Transport, transport)))

    def connection_lost(self, exc: BaseException | None) -> None:
        hook, self.on_lost = getattr(self, "on_lost", None), None
        super().connection_lost(exc)
        if hook is not None:
            hook()


def watch_client(request: web.BaseRequest, on_lost: Callable[[], None] | None) -> bool:
    """Have ``on_lost`` called, once, should the connection ``request`` came on be lost
    (None stops watching). With aiohttp's handler cancellation off, nothing else tells
    a handler waiting on something other than the client that the client is gone: the
    proxy uses it to close the upstream connection of an answer the client left. False
    when the request did not come through a BatchedServer (nothing is watched)."""
    protocol = request.protocol
    if isinstance(protocol, _BatchedRequestHandler):
        protocol.on_lost = on_lost
        return True
    return False
