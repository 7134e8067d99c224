"""Local HTTP receivers standing in for webhook endpoints and Slack: real servers on 127.0.0.1
that answer in scripted ways and record every request (with its delivery id)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from streams.engines import free_port


@dataclass
class Hit:
    path: str
    delivery_id: str | None
    headers: dict
    body: bytes
    at: float
    status: int | None = None   # what the receiver answered (None while it is still answering)

    @property
    def json(self):
        return orjson.loads(self.body)


@dataclass
class Receiver:
    """``script[path]``: a list of answers used in turn (the last one repeats). An answer is
    a status, or (status, headers), or ("sleep", seconds, status). ``host``: the loopback
    address it listens on; ``connections``: TCP connections accepted (counted at accept,
    before a byte of a request is read)."""

    script: dict[str, list] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)
    port: int = 0
    host: str = "127.0.0.1"
    connections: int = 0

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def start(self) -> "Receiver":
        self.port = free_port()
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def handler(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            path = request.path
            hit = Hit(path, request.headers.get("X-Casestream-Delivery-Id"), dict(request.headers), body, time.time())
            self.hits.append(hit)
            answers = self.script.get(path, [200])
            n = sum(1 for h in self.hits if h.path == path) - 1
            answer = answers[min(n, len(answers) - 1)]
            headers = {}
            if isinstance(answer, tuple) and answer[0] == "sleep":
                await asyncio.sleep(answer[1])
                answer = answer[2]
            if isinstance(answer, tuple):
                answer, headers = answer
            if answer in (301, 302, 307, 308):
                headers = {"Location": self.url("/ok"), **headers}
            hit.status = answer
            return web.Response(status=answer, headers=headers, text="ok" if answer < 300 else "no")

        def run():
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app)
            self._loop.run_until_complete(runner.setup())

            def accepted():
                self.connections += 1
                return runner.server()

            self._loop.run_until_complete(self._loop.create_server(accepted, self.host, self.port))
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    def on(self, path: str) -> list[Hit]:
        return [h for h in list(self.hits) if h.path == path]

    def delivery_ids(self, path: str | None = None) -> set[str]:
        return {h.delivery_id for h in list(self.hits) if path is None or h.path == path}
