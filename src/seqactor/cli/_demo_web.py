"""``seqactor demo``'s web page: the static files of ``clients/js/demo/`` over HTTP.

A stdlib ``ThreadingHTTPServer`` in a daemon thread (static files only; the page talks to the
seqactor server itself over its WebSocket). The page gets the server URL and a freshly minted
user token in the URL fragment, which browsers never send to the HTTP server.
"""

from __future__ import annotations

import os
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

# src/seqactor/cli/_demo_web.py -> the checkout's root (parents[3]) -> clients/js/demo
DEMO_DIR = Path(__file__).resolve().parents[3] / "clients" / "js" / "demo"
BUILT_FILE = DEMO_DIR / "dist" / "demo.js"
MAX_PORT = 65_535


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib's name)
        pass

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        """No directory listings: only the page's files are served."""
        self.send_error(HTTPStatus.NOT_FOUND, "not found")
        return None

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


class DemoPage:
    """The running page server; :meth:`close` stops it."""

    def __init__(self, httpd: ThreadingHTTPServer, url: str) -> None:
        self.httpd = httpd
        self.url = url

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def start(host: str, port: int, ws_url: str, token: str) -> DemoPage | None:
    """Serve the demo page on ``host:port`` (0: any free port) and print its URL.

    ``port`` outside 1-65535 or taken: any free port. Returns None (with a one-line note on
    stdout) when the page has not been built or no port can be had.
    """
    if not BUILT_FILE.exists():
        print("web page: not built (run `make js-build`, or `npm ci && npm run build` in "
              "clients/js)", flush=True)
        return None
    handler = partial(_Quiet, directory=str(DEMO_DIR))
    try:
        httpd = ThreadingHTTPServer((host, port if 0 < port <= MAX_PORT else 0), handler)
    except OSError:
        try:
            httpd = ThreadingHTTPServer((host, 0), handler)
        except OSError as exc:
            print(f"web page: not served ({exc.strerror or exc})", flush=True)
            return None
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="seqactor-demo-web", daemon=True).start()
    web_host = f"[{host}]" if ":" in host else host
    url = (f"http://{web_host}:{httpd.server_address[1]}/"
           f"#url={quote(ws_url, safe='')}&token={quote(token, safe='')}")
    print(f"open the web page (user1's view): {url}", flush=True)
    return DemoPage(httpd, url)
