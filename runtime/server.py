"""`runtime serve`: one bundle behind an OpenAI-compatible HTTP API.

The standard library's `ThreadingHTTPServer`, as mlx-lm's server: a model decodes one sequence
at a time, so an asynchronous framework would buy nothing but dependencies, and the HTTP work
per token (one small write) is nothing beside a decode step (benchmarks/bench_server.py
measures the difference against the Python API).

Threads: each connection has one, which reads the request, checks it (runtime/openai_api.py:
every field, once) and queues it; the engine runs the generations one at a time, in arrival
order (`queue.Queue` is first in, first out), on the thread that called `serve` (the one that
loaded the model), so all MLX work happens on one thread: MLX's streams belong to a thread, and
a compiled step or a lazy cache made on one cannot be evaluated on another. Tokens come back to
the connection's thread through the request's own queue, which writes them out, as server-sent
events when streamed. A client that goes away is noticed on the next write (or, while it
waits, by a peek at its socket), and its generation stops at the next token.

The engine keeps the KV cache of the last request twice: as it ended, and as it was after the
prompt (a snapshot: views of the same buffers). A request whose tokens extend either one (a
conversation's next turn) prefills only its new tokens; the snapshot serves when the reply came
back changed (the chat format trims it, a stop string cut it, another stop token ended it).
Replies are re-tokenized when a client sends them back, and a tokenizer does not always split a
text the way the model produced it, so a request whose *text* extends the cached text counts as
an extension too: the cached tokens, then the rest of the text tokenized. Either way the model
sees its own tokens followed by the new ones; `usage.prompt_tokens_details.cached_tokens` says
how many came from the cache.
"""

from __future__ import annotations

import copy
import json
import queue
import select
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlx.core as mx

from runtime.generate import prefill, stream_generate
from runtime.inputs import context_length_of
from runtime.openai_api import (
    ApiError,
    Request,
    Served,
    TokenLogprob,
    chat_request,
    completion_request,
    full_response,
    models_list,
    stream_chunk,
    token_logprob,
    usage,
    usage_chunk,
)
from runtime.precompile import SIGNAL_POLL_S
from runtime.stops import StopStrings

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 64 << 20  # an oversized body up to this is read (and dropped) before the 413 goes out
GEMMA3N_CONTEXT = 32768  # max_position_embeddings of every Gemma3n, for configs that omit it
CLIENT_POLL_S = 0.2
# A client that sends nothing for this long (mid-request line, headers or body, or idle between
# requests on a kept-alive connection), or reads nothing of an answer for this long, is dropped
# (`serve --client-timeout`); and a body must arrive whole within twice that of its headers, so
# one byte now and then cannot hold a connection (slow loris). Waiting in the queue or for tokens
# is not sending.
DEFAULT_CLIENT_TIMEOUT_S = 30.0


@dataclass
class Delta:
    """Released text and the tokens whose text it completes (with log-probabilities if asked)."""

    text: str
    tokens: list[TokenLogprob]


@dataclass
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    error: ApiError


class Job:
    """A checked request on its way through the engine, and the events coming back."""

    def __init__(self, request: Request):
        self.request = request
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()


def context_length(model) -> int:
    """The model's max_position_embeddings (checked where the config entered, manifests/config.py)."""
    return context_length_of(model) or GEMMA3N_CONTEXT


def bias_processor(bias: dict[int, float], vocab_size: int):
    """OpenAI's `logit_bias` as a logits processor: a fixed vector added to every step's logits."""
    dense = mx.zeros((vocab_size,), mx.float32)
    dense[mx.array(list(bias), mx.int32)] = mx.array(list(bias.values()), mx.float32)

    def add(tokens, logits):
        return logits + dense.astype(logits.dtype)

    return add


def snapshot(cache: list) -> list:
    """A copy of `cache` that later updates of it cannot change: new views of the same arrays (no
    bytes copied until the live cache writes into a shared buffer) and the same counters; layers
    that share one cache object (KV-shared layers) still share one in the copy."""
    copies: dict[int, object] = {}
    for entry in cache:
        if id(entry) not in copies:
            twin = copy.copy(entry)
            for name, value in vars(twin).items():
                if isinstance(value, mx.array):
                    setattr(twin, name, value[...])
            copies[id(entry)] = twin
    return [copies[id(entry)] for entry in cache]


@dataclass
class Kept:
    """A KV cache the engine kept, and the token ids it holds."""

    ids: list[int]
    cache: list


class Engine:
    """Runs queued requests one after another (`run_forever`), keeping two KV caches: the last
    request's as it ended (prompt and reply), and a snapshot of it after its prompt, which the
    next turn of a conversation extends whatever became of the reply (trimmed by the chat
    format, cut by a stop string, ended by another stop token than the format's)."""

    def __init__(self, model, tokenizer, *, reuse_cache: bool = True, log: Callable[[str], None] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.reuse_cache = reuse_cache
        self.context = context_length(model)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.jobs: queue.Queue = queue.Queue()
        self.kept: list[Kept] = []  # the longest first

    def submit(self, request: Request) -> Job:
        job = Job(request)
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        """Make `run_forever` return once the requests queued before this one are done."""
        self.jobs.put(None)

    def run_forever(self) -> None:
        """Run requests as they come, on this thread, until `stop`.

        Idle, it wakes every SIGNAL_POLL_S: Python runs a signal's handler on the main thread,
        between its bytecodes, and a SIGINT or SIGTERM handled on another thread (the kernel may
        hand a process's signal to any) or just before the main one blocked on the queue with no
        timeout left the server waiting for a request that never came (a Ctrl-C hung it)."""
        while True:
            try:
                job = self.jobs.get(timeout=SIGNAL_POLL_S)
            except queue.Empty:
                continue
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            try:
                self.run(job)
            except (ValueError, TypeError) as e:  # the runtime's own input checks: the request's fault
                self.kept = []
                job.events.put(Failed(ApiError(400, str(e).splitlines()[0] if str(e) else type(e).__name__)))
            except Exception as e:  # a bug, not a bad request: say so, drop the cache, keep serving
                self.kept = []
                self.log("error: " + "".join(traceback.format_exception_only(type(e), e)).strip())
                traceback.print_exc(file=sys.stderr)
                job.events.put(Failed(ApiError(500, f"generation failed: {e}", kind="server_error")))

    # The cache ----------------------------------------------------------------------------------

    def _extension(self, known: list[int], ids: list[int]) -> list[int] | None:
        """`ids` continued from `known`, when they (or their text) extend it: the known tokens, then
        the rest of the text tokenized."""
        if len(ids) > len(known) and ids[:len(known)] == known:
            return ids
        decode = self.tokenizer.decode
        old, new = decode(known, skip_special_tokens=False), decode(ids, skip_special_tokens=False)
        if len(new) <= len(old) or not new.startswith(old):
            return None
        extended = known + self.tokenizer.encode(new[len(old):], add_special_tokens=False)
        return extended if decode(extended, skip_special_tokens=False) == new else None

    def _prepare(self, ids: list[int]) -> tuple[list[int], list, int]:
        """(the ids to run, the cache to run them on, how many of them it holds already)."""
        kept, self.kept = self.kept, []  # this request keeps its own
        for k in kept:
            extended = self._extension(k.ids, ids)
            if extended is not None and len(extended) < self.context:
                return extended, k.cache, len(k.ids)
        return ids, self.model.make_cache(), 0

    def _prefill_all_but_last(self, ids: list[int], cache: list, cached: int) -> None:
        """Prefill the new prompt tokens but the last (generation starts from that one) and keep
        a snapshot of the cache at that point."""
        if len(ids) - cached > 1:
            prefill(self.model, mx.array(ids[cached:-1]), cache)
            mx.eval([entry.state for entry in cache])
        self.kept = [Kept(ids[:-1], snapshot(cache))]

    # One request --------------------------------------------------------------------------------

    def run(self, job: Job) -> None:
        req = job.request
        ids, cache, cached = self._prepare(req.prompt_ids) if self.reuse_cache else \
            (req.prompt_ids, self.model.make_cache(), 0)
        if self.reuse_cache:
            self._prefill_all_but_last(ids, cache, cached)
            start = len(ids) - 1
        else:
            start = 0
        max_tokens = min(req.max_tokens, self.context - len(ids))
        stops = StopStrings(req.stop)
        processors = [bias_processor(req.logit_bias, self.model.config.vocab_size)] if req.logit_bias else None
        tracker = _Released(self.tokenizer, req.logprobs)
        fed, n, finish, first_at, tps = [], 0, None, None, 0.0
        tic = time.perf_counter()
        steps = stream_generate(self.model, self.tokenizer, ids[start:], cache=cache, max_tokens=max_tokens,
                                sampling=req.sampling, eos_token_ids=req.eos_ids, logits_processors=processors)
        try:
            for r in steps:
                n, tps = n + 1, r.generation_tps
                first_at = first_at or time.perf_counter()
                if r.cached:
                    fed.append(r.token)
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                eos = r.finish_reason == "stop"
                released, stopped = stops.add(r.text)
                end = r.finish_reason is not None
                if end and not stopped:
                    released += stops.flush()
                tokens = tracker.step(r, eos, released, final=stopped or end, cut=stopped)
                if released or tokens:
                    job.events.put(Delta(released, tokens))
                if stopped or end:
                    finish = "stop" if stopped or eos else "length"
                    break
        finally:
            steps.close()  # hands the cache back from the compiled decoder
        if self.reuse_cache:
            self.kept.insert(0, Kept(ids + fed, cache))
        if finish == "cancelled":
            self.log(f"{req.id}: client went away; stopped after {n} of at most {max_tokens} tokens")
            return
        job.events.put(Done(finish or "length", len(ids), n, cached))
        ttft = (first_at or time.perf_counter()) - tic
        self.log(f"{req.id}: prompt {len(ids)} tokens ({cached} from cache), first token {ttft * 1000:.0f} ms, "
                 f"{n} generated at {tps:.1f} tok/s, {finish}")


class _Released:
    """Which generated tokens' text has been released, for their log-probabilities: a token goes
    out with the text that completes it; one whose text a stop string cut off never does."""

    def __init__(self, tokenizer, k: int | None):
        self.tokenizer, self.k = tokenizer, k
        self.pending: list[tuple[int, int, TokenLogprob]] = []  # (start, end) in the generated text
        self.generated = 0  # characters generated so far
        self.released = 0   # characters released so far

    def step(self, r, eos: bool, released: str, final: bool, cut: bool) -> list[TokenLogprob]:
        if self.k is not None and not eos:
            info = token_logprob(self.tokenizer, r.token, r.logprobs, self.k)
            info.offset = self.generated
            self.pending.append((self.generated, self.generated + len(r.text), info))
        self.generated += len(r.text)
        self.released += len(released)
        if final and not cut:
            out, self.pending = [t for _, _, t in self.pending], []
            return out
        ready = [p for p in self.pending if (p[0] < self.released if cut else p[1] <= self.released)]
        self.pending = [] if cut else [p for p in self.pending if p[1] > self.released]
        return [t for _, _, t in ready]


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, engine: Engine, served: Served, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 client_timeout: float = DEFAULT_CLIENT_TIMEOUT_S):
        self.engine, self.served, self.max_body_bytes = engine, served, max_body_bytes
        self.client_timeout = client_timeout
        self.started = int(time.time())
        super().__init__(address, Handler)


ROUTES = {"/v1/chat/completions": chat_request, "/v1/completions": completion_request}


# BaseHTTPRequestHandler's own refusals, before a route is reached, as OpenAI error codes.
_HTTP_CODES = {400: "bad_request", 405: "method_not_allowed", 408: "request_timeout", 414: "uri_too_long",
               431: "headers_too_large"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx-prepared"
    server: Server

    def setup(self):
        self.timeout = self.server.client_timeout  # StreamRequestHandler.setup applies it to the socket
        super().setup()

    def log_request(self, code="-", size="-"):
        if isinstance(code, int) and code >= 400:
            self.log_message('"%s" %s', self.requestline, str(code))

    def handle_one_request(self):
        """One request; a client gone or silent past the client timeout (an OSError on its socket)
        closes the connection in one log line, and a bug in a handler is a 500 in OpenAI's shape
        (and its traceback in the log) rather than a connection closed without an answer."""
        # The request line and headers whole within three client timeouts (the first of them may
        # be the idle wait for a request): a header sent one byte a timeout apart would otherwise
        # hold the connection for ever. Past it, the socket is shut under the read.
        self._headers_due = threading.Timer(3 * self.server.client_timeout, self._drop)
        self._headers_due.daemon = True
        self._headers_due.start()
        try:
            super().handle_one_request()
        except OSError as e:  # TimeoutError, BrokenPipeError, ConnectionResetError: the client's doing
            self.close_connection = True
            self.log_message("client connection dropped (%s)", type(e).__name__)
        except Exception as e:
            self.close_connection = True
            traceback.print_exc(file=sys.stderr)
            try:
                self._error(ApiError(500, f"internal error: {type(e).__name__}", kind="server_error"))
            except OSError:
                pass
        finally:
            self._headers_due.cancel()

    def parse_request(self) -> bool:
        try:
            return super().parse_request()  # reads the headers
        finally:
            self._headers_due.cancel()

    def _drop(self):
        """The request's headers did not come whole in time: end the connection under the read."""
        self.close_connection = True
        self.log_message("client connection dropped (headers not whole within %g s)", 3 * self.server.client_timeout)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def send_error(self, code, message=None, explain=None):
        """BaseHTTPRequestHandler's own refusals (a request line it cannot parse, headers too many or
        too long, a URI too long, a method with no handler) with OpenAI's JSON error body, not an
        HTML page; a method other than GET and POST is 405 with Allow."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9" and len(getattr(self, "requestline", "").split()) >= 3:
            self.request_version = "HTTP/1.0"  # a version it could not read, not HTTP/0.9: answer with a status line
        if code == 501 and getattr(self, "command", None):  # BaseHTTPRequestHandler: no do_<METHOD>
            code, message = 405, f"method {self.command} is not allowed here (GET or POST)"
        e = ApiError(code, message or HTTPStatus(code).phrase, code=_HTTP_CODES.get(code, "bad_request"))
        data = json.dumps(e.body()).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        if code == 405:
            self.send_header("Allow", "GET, POST")
        self.end_headers()
        if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(data)

    def _route(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    def do_GET(self):
        if self._route() == "/v1/models":
            self._json(200, models_list(self.server.served.model_id, self.server.started))
        elif self._route() == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._error(ApiError(404, f"no such endpoint: GET {self._route()}", code="not_found"))

    def do_POST(self):
        door = ROUTES.get(self._route())
        try:
            raw = self._body()
            if door is None:
                raise ApiError(404, f"no such endpoint: POST {self._route()}", code="not_found")
            request = door(raw, self.server.served)
        except ApiError as e:
            self._error(e)
            return
        job = self.server.engine.submit(request)
        if request.stream:
            self._stream(job)
        else:
            self._whole(job)

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length; chunked bodies are not accepted",
                           code="length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a request body with a Content-Length header is required", code="length_required")
        if not (length.isascii() and length.isdigit()):  # "²".isdigit() too, and int() refuses it
            self.close_connection = True
            raise ApiError(400, f"Content-Length: not a byte count: {length[:40]!r}", code="invalid_header")
        limit = self.server.max_body_bytes
        n = int(length) if len(length) <= 18 else 10**18  # longer is past any limit (and int() stops at 4300 digits)
        if n > limit:
            # Read and drop a body up to DRAIN_BYTES, so the client, still sending, gets to read the
            # answer (closing on it mid-send makes it see a broken pipe instead); close on a larger one.
            if n <= max(DRAIN_BYTES, limit):
                self._read(n, keep=False)
            else:
                self.close_connection = True
            raise ApiError(413, f"the body is {length if len(length) <= 18 else 'over 10^18'} bytes; this server "
                                f"accepts at most {limit}",
                           code="request_too_large")
        return self._read(n)

    def _read(self, n: int, keep: bool = True) -> bytes:
        """`n` bytes of body (fewer if the client closes), within twice the client timeout in all."""
        within = 2 * self.server.client_timeout
        deadline = time.monotonic() + within
        chunks = []
        try:
            while n > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.connection.settimeout(min(left, self.server.client_timeout))
                chunk = self.rfile.read1(min(n, 1 << 16))
                if not chunk:
                    break
                n -= len(chunk)
                if keep:
                    chunks.append(chunk)
        except TimeoutError:
            self.close_connection = True
            silent = time.monotonic() < deadline  # the client sent nothing for a whole timeout
            why = (f"nothing of it came for {self.server.client_timeout:g} s" if silent
                   else f"it did not arrive whole within {within:g} s")
            raise ApiError(408, f"the body stopped short of its Content-Length: {why}", code="request_timeout") \
                from None
        finally:
            self.connection.settimeout(self.server.client_timeout)
        return b"".join(chunks)

    # Responses ----------------------------------------------------------------------------------

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self._json(e.status, e.body())

    def _client_gone(self) -> bool:
        """The client closed its end (a peek reads end of file) while we were still working."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _next(self, job: Job):
        """The job's next event, or None once the client has gone (the job is then cancelled)."""
        while True:
            try:
                return job.events.get(timeout=CLIENT_POLL_S)
            except queue.Empty:
                if self._client_gone():
                    job.cancelled.set()
                    return None

    def _whole(self, job: Job) -> None:
        req, model_id = job.request, self.server.served.model_id
        text, tokens = [], []
        while (event := self._next(job)) is not None:
            if isinstance(event, Delta):
                text.append(event.text)
                tokens += event.tokens
            elif isinstance(event, Failed):
                self._error(event.error)
                return
            else:
                totals = usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                self._json(200, full_response(req, model_id, "".join(text), tokens, event.finish_reason, totals))
                return
        self.close_connection = True

    def _stream(self, job: Job) -> None:
        req, model_id = job.request, self.server.served.model_id

        def send(obj) -> None:
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if req.kind == "chat":
                send(stream_chunk(req, model_id, None, first=True))
            while (event := self._next(job)) is not None:
                if isinstance(event, Delta):
                    send(stream_chunk(req, model_id, event.text, event.tokens))
                elif isinstance(event, Failed):
                    send(event.error.body())
                    break
                else:
                    send(stream_chunk(req, model_id, None if req.kind == "chat" else "", finish=event.finish_reason))
                    if req.include_usage:
                        send(usage_chunk(req, model_id, usage(event.prompt_tokens, event.completion_tokens,
                                                              event.cached_tokens)))
                    send(b"[DONE]")
                    break
            else:
                self.close_connection = True
                return
            self.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client went away mid-stream: stop its generation
            job.cancelled.set()
            self.close_connection = True


def make_server(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                default_max_tokens: int = 256, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                reuse_cache: bool = True, log: Callable[[str], None] | None = None,
                client_timeout: float = DEFAULT_CLIENT_TIMEOUT_S) -> Server:
    """A server bound to (host, port), not yet serving: see `serve`."""
    if tokenizer is None:
        raise ValueError("serving needs a tokenizer; this bundle has no tokenizer.json")
    served = Served(model_id=model_id, tokenizer=tokenizer, vocab_size=model.config.vocab_size,
                    context_length=context_length(model), default_max_tokens=default_max_tokens)
    engine = Engine(model, tokenizer, reuse_cache=reuse_cache, log=log)
    return Server((host, port), engine, served, max_body_bytes, client_timeout)


def serve(server: Server) -> None:
    """Answer HTTP on a background thread and generate on this one until interrupted (Ctrl-C)
    or `server.engine.stop()`; then close the socket."""
    http = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    http.start()
    try:
        server.engine.run_forever()
    finally:
        server.shutdown()
        server.server_close()
