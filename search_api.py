"""The search engine over HTTP: Search-R1's retrieval API, both ends.

Search-R1's trainer holds no index. Each rollout turn it POSTs that turn's queries to a retrieval
server (E5 + FAISS, BM25 or a web-search proxy behind it) and puts the passages it gets back into
the context. Speaking that API both ways makes searchr1 one part of that ecosystem:

    python searchr1.py serve --corpus wiki-18.jsonl.gz      # searchr1's BM25 index as a server
    python searchr1.py train --search-url http://host:8000/retrieve   # train against any server

The API, Search-R1's exactly:

    POST /retrieve   {"queries": ["who wrote hamlet", ...], "topk": 3, "return_scores": true}
    200 OK           {"result": [[{"document": {"id": "7", "contents": "\\"Hamlet\\"\\nHamlet is ...",
                                                "title": "\\"Hamlet\\"", "text": "Hamlet is ..."},
                                   "score": 14.2},              <- best passage of query 1
                                  ...],                          <- top-k of query 1
                                 ...]}                           <- one list per query, in order

`topk` null or absent = the server's default (3). Without `return_scores` an item is the document
object alone. Search-R1's own servers send `contents` with id (dense) or title/text (BM25); this one
sends all four. A bad request gets a 4xx and {"error": "..."} naming what is wrong.

The client, `RemoteIndex`, reads `contents` only (the one field every Search-R1 server sends) and
splits it into title and text as the in-process index does (`retriever.make_hit`), so `format_passages`
makes the same observation, to the character, whichever side of the socket the passages came from.

Where this departs from Search-R1:
- The server is the standard library's threaded HTTP server, not FastAPI + uvicorn: no dependency.
  What HTTP adds to a batch of 256 queries (`python bench.py serve`) is mostly JSON -- 641 kB, 4-8 ms
  of CPU to encode and decode beside a ~31 ms search -- which a framework would not make cheaper,
  plus a few ms of sockets and thread wake-ups.
- Limits that Search-R1's server does not have: topk <= 100, 4,096 queries and 4 MiB a request;
  topk 0 is an error here (Search-R1 reads it as "the default").
- Search-R1's client posts once and trusts the answer. `RemoteIndex` has a timeout, retries with
  exponential backoff, checks the answer's shape, and then raises `SearchUnavailable` naming the
  URL, which `searchr1.train` turns into a saved checkpoint and a hint to --resume.
"""
import http.client
import http.server
import json
import threading
import time
import traceback
from http import HTTPStatus
from urllib.parse import urlsplit

from retriever import make_hit

PATH = "/retrieve"
DEFAULT_TOPK = 3  # Search-R1's servers are started with --topk 3
MAX_TOPK = 100
MAX_QUERIES = 4_096  # a GRPO turn sends batch x group queries at most (512 x 5 in the paper's run)
MAX_BODY_BYTES = 4 * 2**20  # 4,096 queries of ~1,000 characters
KEEP_ALIVE_S = 1.0  # the client reuses a connection idle for less; servers close idle ones (uvicorn: 5 s)


# ----------------------------------------------------------------------------- the server
class BadRequest(ValueError):
    """A request the server refuses: its HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_request(body: bytes, default_topk: int = DEFAULT_TOPK) -> tuple[list[str], int, bool]:
    """(queries, topk, return_scores) of a /retrieve body, or BadRequest saying what is wrong."""
    try:
        request = json.loads(body)
    except ValueError as error:  # invalid JSON or invalid UTF-8
        raise BadRequest(400, f"the body is not valid JSON ({error})") from None
    if not isinstance(request, dict):
        raise BadRequest(400, 'the body must be a JSON object {"queries": [...], "topk": ..., ...}')
    queries = request.get("queries")
    if not isinstance(queries, list):
        raise BadRequest(400, "'queries' must be a list of strings"
                              + (" (it is missing)" if "queries" not in request else ""))
    if len(queries) > MAX_QUERIES:
        raise BadRequest(413, f"{len(queries):,} queries in one request; at most {MAX_QUERIES:,}")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise BadRequest(400, f"queries[{i}] must be a string, got {type(query).__name__}")
    topk = request.get("topk")
    if topk is None:
        topk = default_topk
    elif isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= MAX_TOPK:
        raise BadRequest(400, f"'topk' must be an integer from 1 to {MAX_TOPK} (or null for "
                              f"{default_topk}), got {json.dumps(topk)}")
    return_scores = request.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(400, f"'return_scores' must be true or false, got {json.dumps(return_scores)}")
    return queries, topk, return_scores


def retrieve(index, queries: list[str], topk: int, return_scores: bool) -> dict:
    """Search-R1's response: {"result": per query its top-k documents, with scores if asked}."""
    result = []
    for hits in index.search(queries, k=topk):
        documents = [{"id": h["id"], "contents": h["contents"], "title": h["title"], "text": h["text"]}
                     for h in hits]
        result.append([{"document": d, "score": h["score"]} for d, h in zip(documents, hits)]
                      if return_scores else documents)
    return {"result": result}


class SearchHandler(http.server.BaseHTTPRequestHandler):
    """One connection: POST /retrieve, answered from `self.server.index`."""
    protocol_version = "HTTP/1.1"  # keep-alive: a client may send batch after batch on one connection
    # Headers and body leave in two writes. With Nagle's algorithm on, the body would wait for the
    # client to acknowledge the headers, which a keep-alive client delays by up to 40 ms (measured:
    # 44 ms per 1-query request over keep-alive with it, under 1 ms without).
    disable_nagle_algorithm = True
    timeout = 60  # seconds a silent client may hold its thread

    def do_POST(self):
        if urlsplit(self.path).path != PATH:
            return self.send_error(404, f"no such path {self.path!r}; the API is POST {PATH}")
        length = self.headers.get("Content-Length")
        if length is None:
            return self.send_error(411, "a Content-Length header is required")
        if not length.isdigit():
            return self.send_error(400, f"Content-Length must be a byte count, got {length!r}")
        if int(length) > MAX_BODY_BYTES:  # refused before reading a byte of it
            return self.send_error(413, f"the body has {int(length):,} bytes; at most {MAX_BODY_BYTES:,}")
        try:
            answer = retrieve(self.server.index, *parse_request(self.rfile.read(int(length)),
                                                                 self.server.default_topk))
        except BadRequest as error:
            return self.send_error(error.status, str(error))
        except Exception:  # a bug or a broken index: the traceback stays in the server's log
            self.log_message("500 on %s:\n%s", self.path, traceback.format_exc().rstrip())
            return self.send_error(500, "internal error while searching (see the server's log)")
        self._send_json(200, answer)

    def _method_not_allowed(self):
        self.send_error(405, f"{self.command} is not allowed; the API is POST {PATH}")

    do_GET = do_HEAD = do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def send_error(self, code: int, message: str | None = None, explain=None):
        """Every error, ours and http.server's own (a malformed request line, ...): JSON and one log line."""
        message = message or HTTPStatus(code).phrase
        self.log_message("%d %s: %s", code, self.command or "-", message)
        self.close_connection = True  # the rest of a refused request is never read
        self._send_json(code, {"error": message})

    def _send_json(self, code: int, answer: dict):
        body = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code == 405:
            self.send_header("Allow", "POST")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        pass  # a served request is not logged; errors are, one line each (send_error)


class SearchServer(http.server.ThreadingHTTPServer):
    """A thread per connection, all searching one index (BM25Index or anything with .search)."""
    daemon_threads = True  # Ctrl-C does not wait for clients that keep their connection open

    def __init__(self, index, host: str = "127.0.0.1", port: int = 8000, default_topk: int = DEFAULT_TOPK):
        super().__init__((host, port), SearchHandler)
        self.index, self.default_topk = index, default_topk

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{PATH}"


def serve(index, host: str = "127.0.0.1", port: int = 8000, default_topk: int = DEFAULT_TOPK) -> None:
    """Answer POST /retrieve from `index` until Ctrl-C. Port 0 picks a free port (printed)."""
    with SearchServer(index, host, port, default_topk) as server:
        print(f"serving {len(index):,} passages at {server.url} (Ctrl-C to stop)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", flush=True)


# ----------------------------------------------------------------------------- the client
class SearchUnavailable(OSError):
    """The search server gave no usable answer after every retry; the message names the URL."""


def _hit(item) -> dict:
    """One item of a /retrieve answer -> {"id", "contents", "title", "text", "score"}, or ValueError."""
    document = item.get("document") if isinstance(item, dict) else None
    if not (isinstance(document, dict) and isinstance(document.get("contents"), str)
            and type(item.get("score")) in (int, float)):
        raise ValueError('expected items {"document": {"contents": str, ...}, "score": number}, '
                         f"got {json.dumps(item)[:200]}")
    return make_hit(str(document.get("id", "")), document["contents"], float(item["score"]))


def parse_answer(answer, n_queries: int) -> list[list[dict]]:
    """A /retrieve answer -> per query its hits, or ValueError when it is not such an answer."""
    result = answer.get("result") if isinstance(answer, dict) else None
    if not (isinstance(result, list) and len(result) == n_queries
            and all(isinstance(items, list) for items in result)):
        raise ValueError(f'expected {{"result": [...]}} with one list per query ({n_queries})')
    return [[_hit(item) for item in items] for items in result]


class RemoteIndex:
    """A Search-R1 retrieval server, searched like a BM25Index: `.search(queries, k)`.

    One POST per call carries every query. Connection errors, timeouts, 5xx and garbage answers are
    retried after backoff_s, 2 backoff_s, 4 backoff_s, ...; a 4xx is not (the request itself is
    wrong). Then SearchUnavailable names the URL and the last problem.
    """

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 4, backoff_s: float = 1.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the search URL must look like http://host:port/retrieve, got {url!r}")
        self.url, self.timeout, self.retries, self.backoff_s = url, timeout, retries, backoff_s
        self._host, self._path = parts.netloc, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._https = parts.scheme == "https"
        self._kept = threading.local()  # per thread: (its open connection, when it last answered)

    def search(self, queries: list[str], k: int = 3) -> list[list[dict]]:
        """Per query, its top-k passages best first: {"id", "contents", "title", "text", "score"}."""
        if isinstance(queries, str):
            raise TypeError("search takes a list of queries, not one string")
        if not queries:
            return []
        body = json.dumps({"queries": list(queries), "topk": k, "return_scores": True}).encode()
        for attempt in range(1, self.retries + 2):
            try:
                status, answer = self._post(body)
                if status == 200:
                    return parse_answer(json.loads(answer), len(queries))
                problem = f"HTTP {status}: {answer[:500].decode(errors='replace')}"
                if status < 500:
                    break  # the request itself is wrong: asking again cannot help
            except (OSError, http.client.HTTPException, ValueError) as error:  # unreachable, dropped, garbage
                problem = f"{type(error).__name__}: {error}"
            if attempt <= self.retries:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise SearchUnavailable(f"search server {self.url} failed after {attempt} attempt(s): {problem}")

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """POST body to the URL: (status, answer). A connection that answered less than KEEP_ALIVE_S
        ago is used again: a new one costs the server a thread start, 1-3 ms of a 256-query batch."""
        kept = getattr(self._kept, "connection", None)
        if kept and time.monotonic() - kept[1] < KEEP_ALIVE_S:
            connection = kept[0]
        else:
            if kept:
                kept[0].close()
            connection_class = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            connection = connection_class(self._host, timeout=self.timeout)
        self._kept.connection = None
        try:
            connection.request("POST", self._path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = response.read()
        except BaseException:
            connection.close()
            raise
        self._kept.connection = (connection, time.monotonic())
        return response.status, answer
