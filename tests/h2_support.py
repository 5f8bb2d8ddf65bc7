"""A gRPC caller written at the HTTP/2 frame level, for tests of what the server takes in.

grpcio's own client buffers a whole message before it sends it, so a test that wants 128
callers announcing 14 MiB each would hold 1.8 GiB itself. This one announces a message's
length in the 5-byte gRPC prefix and then sends only what the server's flow-control windows
let it (``RawCall.sent`` says how much that was), or the whole message if the server keeps
granting windows. One payload buffer is shared by every call, so the client stays small and
the server's resident memory can be read from the same process.

Only what these tests need: no TLS, no padding or priority, and HPACK without Huffman or a
dynamic table (the client's SETTINGS set the server's encoder table to 0, so every header the
server sends is a literal or a static-table index).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
HEADER_TABLE_SIZE, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 4, 5
_DEFAULT_WINDOW = 65_535
_FRAME = 16_384  # the frame size every HTTP/2 peer must accept


@dataclass
class RawCall:
    """One call's fate: bytes of its message sent, and how the server ended it."""

    stream_id: int
    announced: int  # the message length in the gRPC prefix
    sent: int = 0  # message bytes sent (the prefix not counted)
    window: int = _DEFAULT_WINDOW
    status: int | None = None  # grpc-status; None: no trailers (reset, or still open)
    trailers: dict[str, str] = field(default_factory=dict)
    reset: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class RawConnection:
    """One HTTP/2 connection carrying any number of unary calls at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.calls: dict[int, RawCall] = {}
        self.window = _DEFAULT_WINDOW  # the connection's send window
        self.initial_window = _DEFAULT_WINDOW  # what the server's SETTINGS give each new stream
        self.granted = asyncio.Event()  # set on every window update
        self.settled = asyncio.Event()  # the server's first SETTINGS have arrived
        self.closed = False
        self._next_id = 1
        self._reading: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection(host, port)
        conn = cls(reader, writer)
        settings = struct.pack(">HI", HEADER_TABLE_SIZE, 0)  # no dynamic table: the decoder below needs none
        writer.write(PREFACE + _frame(SETTINGS, 0, 0, settings))
        conn._reading = asyncio.create_task(conn._read_frames())
        try:
            await asyncio.wait_for(conn.settled.wait(), 10)
            if conn.closed:
                raise ConnectionError("the server closed the connection before its SETTINGS")
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def call(self, path: str, payload: memoryview, announced: int,
                   metadata: tuple[tuple[str, str], ...] = (), send_at_most: int | None = None) -> RawCall:
        """Send ``payload[:announced]`` as far as the windows allow (and at most ``send_at_most``
        bytes of it); return once the server ends the call (the caller's timeout decides
        otherwise)."""
        call = RawCall(self._next_id, announced, window=self.initial_window)
        self._next_id += 2
        self.calls[call.stream_id] = call
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "127.0.0.1"),
                   ("content-type", "application/grpc"), ("te", "trailers"), *metadata]
        self.writer.write(_frame(HEADERS, END_HEADERS, call.stream_id, _hpack(headers)))
        prefix, started = b"\x00" + struct.pack(">I", announced), False
        stop = announced if send_at_most is None else min(announced, send_at_most)
        while not call.done.is_set() and (not started or call.sent < stop):
            room = min(call.window, self.window, _FRAME)
            if room <= len(prefix):  # the prefix goes in one frame with the message's first bytes
                self.granted.clear()
                await _first(self.granted.wait(), call.done.wait())
                continue
            head = b"" if started else prefix
            body = bytes(payload[call.sent:min(stop, call.sent + room - len(head))])
            chunk, started = head + body, True
            call.sent += len(body)
            last = call.sent == announced
            self.writer.write(_frame(DATA, END_STREAM if last else 0, call.stream_id, chunk))
            call.window -= len(chunk)
            self.window -= len(chunk)
            await self.writer.drain()
        await call.done.wait()
        return call

    async def _read_frames(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags, stream_id = head[3], head[4], struct.unpack(">I", head[5:])[0] & 0x7FFFFFFF
                self._on_frame(kind, flags, stream_id, await self.reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed = True
            self.settled.set()
            for call in self.calls.values():
                call.done.set()
            self.granted.set()

    def _on_frame(self, kind: int, flags: int, stream_id: int, body: bytes) -> None:
        call = self.calls.get(stream_id)
        if kind == SETTINGS and not flags & ACK:
            for i in range(0, len(body), 6):
                ident, value = struct.unpack(">HI", body[i:i + 6])
                if ident == INITIAL_WINDOW_SIZE:
                    self._resize_windows(value)
            self.writer.write(_frame(SETTINGS, ACK, 0, b""))
            self.settled.set()
        elif kind == PING and not flags & ACK:
            self.writer.write(_frame(PING, ACK, 0, body))
        elif kind == WINDOW_UPDATE:
            grant = struct.unpack(">I", body)[0] & 0x7FFFFFFF
            if stream_id == 0:
                self.window += grant
            elif call is not None:
                call.window += grant
            self.granted.set()
        elif kind == HEADERS and call is not None:
            call.trailers.update(decode_headers(body))
            if "grpc-status" in call.trailers:
                call.status = int(call.trailers["grpc-status"])
            if flags & END_STREAM:
                call.done.set()
        elif kind == RST_STREAM and call is not None:
            call.reset = True
            call.done.set()
        elif kind == GOAWAY:
            self.granted.set()

    def _resize_windows(self, value: int) -> None:
        for call in self.calls.values():
            call.window += value - self.initial_window
        self.initial_window = value
        self.granted.set()


async def _first(*waits: object) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def _frame(kind: int, flags: int, stream_id: int, body: bytes | memoryview) -> bytes:
    return len(body).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream_id) + bytes(body)


def _hpack(headers: list[tuple[str, str]]) -> bytes:
    """Each header as a literal without indexing, with a literal name (RFC 7541 6.2.2)."""
    out = bytearray()
    for name, value in headers:
        out += b"\x00" + _string(name.encode()) + _string(value.encode())
    return bytes(out)


def _string(raw: bytes) -> bytes:
    return _integer(len(raw), 7, 0) + raw


def _integer(value: int, bits: int, high: int) -> bytes:
    top = (1 << bits) - 1
    if value < top:
        return bytes([high | value])
    out, value = bytearray([high | top]), value - top
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes(out + bytes([value]))


def decode_headers(block: bytes) -> dict[str, str]:
    """The literal headers of a block with no dynamic table; indexed ones (":status: 200") and
    Huffman-coded strings are skipped, which grpc-status and grpc-message never are here."""
    found, pos = {}, 0
    while pos < len(block):
        first = block[pos]
        if first & 0x80:  # indexed field: a static-table entry
            _, pos = _read_integer(block, pos, 7)
            continue
        if first & 0xE0 == 0x20:  # dynamic table size update
            _, pos = _read_integer(block, pos, 5)
            continue
        index, pos = _read_integer(block, pos, 6 if first & 0x40 else 4)
        name = None
        if index == 0:
            name, pos = _read_string(block, pos)
        value, pos = _read_string(block, pos)
        if name is not None and value is not None:
            found[name] = value
    return found


def _read_integer(block: bytes, pos: int, bits: int) -> tuple[int, int]:
    top = (1 << bits) - 1
    value, pos = block[pos] & top, pos + 1
    if value < top:
        return value, pos
    shift = 0
    while True:
        byte, pos = block[pos], pos + 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_string(block: bytes, pos: int) -> tuple[str | None, int]:
    huffman = bool(block[pos] & 0x80)
    length, pos = _read_integer(block, pos, 7)
    raw, pos = block[pos:pos + length], pos + length
    return (None if huffman else raw.decode("latin-1")), pos
