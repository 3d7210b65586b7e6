"""Load generator of bench_serve.py: one load point against one server, one JSON line out.

    python benchmarks/serve_load.py --port P --bodies FILE (--clients N | --rate R) --duration S

A minimal asyncio HTTP/1.1 keep-alive client (pre-encoded requests, one connection per in-flight
request): far cheaper per request than httpx. Closed loop: N clients, each sending its next request
when the last one answered. Open loop: requests on a fixed schedule at R req/s, latency measured
from the SCHEDULED send time, so queueing is not hidden.
"""

import argparse
import asyncio
import contextlib
import json
import random
import socket
import time
from pathlib import Path

REQUEST_TIMEOUT_S = 10.0
MAX_REQUESTS_PER_POINT = 100_000


class _Conn:
    """One keep-alive HTTP/1.1 connection; answers are read by Content-Length or chunked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "_Conn":
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.writer.write(raw)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        length, chunked, close = None, False, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value.strip())
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and b"close" in value.lower():
                close = True
        if chunked:
            body = bytearray()
            while True:
                size = int((await self.reader.readline()).split(b";")[0].strip(), 16)
                if size == 0:
                    await self.reader.readline()
                    break
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
            body = bytes(body)
        else:
            body = await self.reader.readexactly(length or 0)
        if close:
            self.close()
            raise _Closed(status, body)
        return status, body

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a broken socket
            self.writer.close()


class _Closed(Exception):
    def __init__(self, status: int, body: bytes):
        self.status, self.body = status, body


def _encode_requests(host: str, port: int, bodies: list[dict], prefix: str = "") -> list[bytes]:
    out = []
    for b in bodies:
        data = json.dumps(b, separators=(",", ":")).encode()
        head = (f"POST {prefix}/recommend HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        out.append(head + data)
    return out


class _Pool:
    def __init__(self, host: str, port: int):
        self.host, self.port, self.idle = host, port, []

    async def call(self, raw: bytes) -> int:
        conn = self.idle.pop() if self.idle else await _Conn.open(self.host, self.port)
        try:
            status, _ = await asyncio.wait_for(conn.request(raw), REQUEST_TIMEOUT_S)
        except _Closed as closed:
            return closed.status
        except BaseException:
            conn.close()
            raise
        self.idle.append(conn)
        return status

    def close(self) -> None:
        for c in self.idle:
            c.close()


def _summary(lat: list[float], ok: int, errors: dict, elapsed: float, extra: dict) -> dict:
    lat = sorted(lat)

    def pct(q: float) -> float | None:
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

    return {"ok": ok, "errors": sum(errors.values()), "error_kinds": errors, "elapsed_s": round(elapsed, 3),
            "throughput": round(ok / elapsed, 1) if elapsed > 0 else 0.0,
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "max_ms": pct(1.0), **extra}


async def _closed_loop(host: str, port: int, raws: list[bytes], clients: int, duration: float) -> dict:
    pool = _Pool(host, port)
    lat: list[float] = []
    errors: dict[str, int] = {}
    ok = 0
    start = time.perf_counter()
    deadline = start + duration
    sent = 0

    async def client(seed: int) -> None:
        nonlocal ok, sent
        rng = random.Random(seed)
        while time.perf_counter() < deadline and sent < MAX_REQUESTS_PER_POINT:
            sent += 1
            raw = raws[rng.randrange(len(raws))]
            t0 = time.perf_counter()
            try:
                status = await pool.call(raw)
            except Exception as err:  # noqa: BLE001 - every failure is counted, none stops the run
                key = type(err).__name__
                errors[key] = errors.get(key, 0) + 1
                continue
            if status == 200:
                ok += 1
                lat.append(time.perf_counter() - t0)
            else:
                errors[f"http_{status}"] = errors.get(f"http_{status}", 0) + 1

    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))),
                           duration + REQUEST_TIMEOUT_S + 5)
    elapsed = time.perf_counter() - start
    pool.close()
    return _summary(lat, ok, errors, elapsed, {"load": f"closed c={clients}", "clients": clients})


async def _open_loop(host: str, port: int, raws: list[bytes], rate: float, duration: float) -> dict:
    pool = _Pool(host, port)
    lat: list[float] = []
    errors: dict[str, int] = {}
    ok = 0
    n = min(int(rate * duration), MAX_REQUESTS_PER_POINT)
    rng = random.Random(0)
    start = time.perf_counter() + 0.05
    tasks = []
    send_lag = 0.0

    async def one(scheduled: float, raw: bytes) -> None:
        nonlocal ok
        try:
            status = await pool.call(raw)
        except Exception as err:  # noqa: BLE001
            key = type(err).__name__
            errors[key] = errors.get(key, 0) + 1
            return
        if status == 200:
            ok += 1
            lat.append(time.perf_counter() - scheduled)  # from the SCHEDULED time
        else:
            errors[f"http_{status}"] = errors.get(f"http_{status}", 0) + 1

    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        send_lag = max(send_lag, time.perf_counter() - scheduled)
        tasks.append(asyncio.ensure_future(one(scheduled, raws[rng.randrange(len(raws))])))
    _done, pending = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 2) if tasks else (set(), set())
    for t in pending:
        t.cancel()
    if pending:
        errors["unfinished"] = len(pending)
    elapsed = time.perf_counter() - start
    pool.close()
    return _summary(lat, ok, errors, elapsed, {"load": f"open {rate:g}/s", "offered": rate,
                                              "max_send_lag_ms": round(1000 * send_lag, 2)})


def load_main(argv: list[str]) -> None:
    """`serve_load.py --port P --bodies FILE (--clients N | --rate R) --duration S` -> one JSON line."""
    p = argparse.ArgumentParser(prog="serve_load.py")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bodies", required=True)
    p.add_argument("--clients", type=int)
    p.add_argument("--rate", type=float)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--prefix", default="", help="route prefix before /recommend")
    a = p.parse_args(argv)
    raws = _encode_requests(a.host, a.port, json.loads(Path(a.bodies).read_text()), a.prefix)
    try:
        import uvloop  # the same event loop uvicorn uses, when installed
        uvloop.install()
    except ImportError:
        pass
    if a.clients:
        result = asyncio.run(_closed_loop(a.host, a.port, raws, a.clients, a.duration))
    else:
        result = asyncio.run(_open_loop(a.host, a.port, raws, a.rate, a.duration))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    import sys

    load_main(sys.argv[1:])
