"""An HTTP listener that records every request it gets: where credentials must never arrive."""

from __future__ import annotations

import http.server
import threading

__all__ = ["Recorder", "serve_recorder"]


class Recorder(http.server.BaseHTTPRequestHandler):
    """Records each request's path and headers; redirects to ``location`` if set, else 404."""

    seen: list[tuple[str, dict[str, str]]]
    location: str | None = None

    def do_GET(self) -> None:
        type(self).seen.append((self.path, dict(self.headers)))
        if self.location:
            self.send_response(302)
            self.send_header("Location", self.location + self.path)
        else:
            self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


def serve_recorder(location: str | None = None) -> tuple[http.server.HTTPServer, type[Recorder]]:
    """A recorder on a free loopback port, served from a thread; ``shutdown()`` it after."""
    handler = type("Recorder", (Recorder,), {"seen": [], "location": location})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, handler
