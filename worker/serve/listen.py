"""How both serving processes (`kvops serve`, `kvops index serve`) open their two APIs: the
caller owns SIGTERM and SIGINT, gRPC starts first, then HTTP, and a port HTTP cannot bind stops
the start with an error instead of a process that serves only half its API."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import grpc
import uvicorn


class HttpServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the caller's stop event owns them."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the process then drains and exits)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def start_listening(
    grpc_server: grpc.aio.Server, http: HttpServer, http_address: str
) -> asyncio.Task:
    """Start both servers; the task runs the HTTP server until `http.should_exit`."""
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve())
    while not http.started and not http_task.done():
        await asyncio.sleep(0.05)
    if http_task.done():
        await grpc_server.stop(0)
        http_task.result()
        raise RuntimeError(f"the HTTP server could not listen on {http_address}")
    return http_task
