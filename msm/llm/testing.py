"""A loopback HTTP server that speaks enough of the Anthropic and OpenAI APIs for their real SDKs.

Tests and benchmarks point the real `anthropic` and `openai` clients at it. It answers with
deterministic text, reports usage the way the APIs do (prompt-cache reads included), and injects
faults at a configurable rate: 429 with retry-after, 500, 529, a hung connection, malformed
JSON, truncation at max_tokens and refusals. It is a server, not a mock of the client.

Where real OpenAI-compatible servers differ, it can be told to behave like llama.cpp's: one
prompt per /v1/completions request (a list is HTTP 500), a cap on `logprobs` (HTTP 400 above it),
`echo` log-probs shifted by one token, streamed chat answers without a usage chunk, and a
`GET /slots` list. Next-token log-probs come from a fixed, hash-seeded "model", so scores are
stable, differ across contexts, and agree between `top_logprobs` and aligned `echo`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TRANSIENT_FAULTS = ("429", "500", "529", "malformed", "hang")
ADJECTIVES = ("careful", "honest", "clear", "difficult", "quiet", "public", "private", "early", "recent", "small",
              "serious", "practical", "shared", "open", "cautious", "simple", "specific", "fair", "steady", "useful")
NOUNS = ("assistant", "model", "team", "user", "reviewer", "operator", "company", "researcher", "policy", "engineer",
         "spec", "auditor", "request", "answer", "rule", "value", "reason", "decision", "risk", "mistake", "record",
         "question", "example", "principle", "system", "document", "meeting", "report", "customer", "teacher")
VERBS = ("explains", "protects", "questions", "supports", "describes", "weighs", "reviews", "respects", "limits",
         "documents", "clarifies", "refuses", "shares", "tests", "defends", "revisits", "measures", "balances",
         "follows", "changes", "notices", "trusts", "checks", "records")
ADVERBS = ("openly", "slowly", "carefully", "rarely", "often", "plainly", "later", "first", "again", "honestly")
LINKS = ("because", "so that", "when", "although", "before", "after", "while", "since", "unless", "and")


@dataclass
class Faults:
    rate: float = 0.0  # share of calls that get a fault
    kinds: tuple[str, ...] = TRANSIENT_FAULTS  # drawn uniformly from these; add "truncate", "refusal"
    retry_after: float = 0.5  # seconds, sent with 429
    hang_s: float = 60.0  # a hung call holds the connection this long (or until the server stops)
    stall_s: float = 60.0  # a stalled stream goes silent this long after its first chunk
    batch_item_rate: float = 0.0  # share of batch items that come back errored or expired
    # A fixed fault schedule: when set, the k-th counted request (Messages, chat, completions; retries
    # included) gets schedule[k % len(schedule)] (None: no fault) instead of a draw at `rate`, so a
    # benchmark pins exactly how many of each fault it injects. "stall" (streamed Messages answers):
    # the stream sends its first events, one more after `stall_after` seconds, then goes silent
    # for `stall_s` and closes without finishing.
    schedule: tuple[str | None, ...] = ()
    stall_after: float = 1.0
    # Fault kinds a Messages request gets at once, before the server's latency, as a rate limiter or
    # an overloaded front end answers (e.g. ("429", "529")); the others come after it. Empty: all after.
    reject_first: tuple[str, ...] = ()


@dataclass
class ServerStats:
    requests: Counter = field(default_factory=Counter)  # path kind -> count
    faults: Counter = field(default_factory=Counter)
    answered: Counter = field(default_factory=Counter)  # content key -> successful answers
    batches_created: int = 0


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:
        """Clients that hang up (timeouts, cancelled tests) are normal here, not errors."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)


# The loopback's tokenizer (words and single punctuation marks, each with the whitespace before it),
# and the vocabulary its next-token log-probs rank. Answer letters are likely after any context,
# so a choice item's letters are always among the top log-probs unless a test hides them.
TOKEN = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")
VOCAB = (" A", " B", "A", "B", " C", " the", " a", " I", " It", "\n", " yes", " no", " Paris", ".", ",", " The",
         " option", " choice", " not", " both", " answer", " is", " of", " to", " and", ":", " my", " Option",
         " we", " depends")
LETTERS = {"A", "B", "C"}


def tokenize(text: str) -> list[tuple[str, int]]:
    """(token, character offset) pairs covering the text."""
    return [(m.group(0), m.start()) for m in TOKEN.finditer(text)]


def next_logprob(prefix: str, token: str) -> float:
    """log P(token | prefix) under the loopback's fixed "model": hash-seeded, so stable per context."""
    h = int(hashlib.sha256(f"{prefix}\x00{token}".encode()).hexdigest()[:8], 16)
    if token.strip() in LETTERS:
        return -(h % 100) / 100 - 0.01  # -0.01 .. -1.0: letters lead
    return -(h % 600) / 100 - 1.01  # -1.01 .. -7.0


def approx_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


def fake_text(seed_text: str, n_tokens: int, causal_share: float | None = None) -> str:
    """Deterministic, varied prose of about n_tokens tokens (4 characters each) for a prompt.

    Word-level choices keep repeated n-grams rare, so the text passes the Gopher filters
    the way ordinary prose does. `causal_share` sets how often a sentence's link word is causal
    (because, so that, since); None draws it uniformly from LINKS (3 in 10).
    """
    rng = random.Random(hashlib.sha256(seed_text.encode()).digest())

    def link() -> str:
        if causal_share is None:
            return rng.choice(LINKS)
        causal = [w for w in LINKS if CAUSAL.fullmatch(w)]
        return rng.choice(causal if rng.random() < causal_share else [w for w in LINKS if w not in causal])

    def clause() -> str:
        return (f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(ADVERBS)} {rng.choice(VERBS)} "
                f"the {rng.choice(NOUNS)}")

    paragraphs, current, length = [], [], 0
    while length < n_tokens * 4:
        sentence = f"{clause()} {link()} {clause()}."
        sentence = sentence[0].upper() + sentence[1:]
        current.append(sentence)
        length += len(sentence) + 1
        if len(current) >= rng.randint(3, 6):
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) or "Ok."


# Condition checks the stand-in judge answers from the document itself: does it use a causal link
# word (the filler prose uses "because", "so that" or "since" in some sentences and not others)?
# True means the criterion passes when a link is present.
LINK_CHECKS = {"attributes_behaviour_to_value": True, "no_link_between_value_and_behaviour": False,
               "no_reason_given": False}
CAUSAL = re.compile(r"\b(because|so that|since)\b", re.I)


def fake_verdicts(seed_text: str, criteria: list[str], fail_rate: float, rates: dict | None = None,
                  link_pass_rate: float | None = None) -> str:
    """The JSON a judge is asked for. Each criterion fails with probability fail_rate (or its own
    rate in `rates`), except the condition checks in LINK_CHECKS, which read the <document> for a
    causal link word, or, given `link_pass_rate`, pass with that probability, drawn per prompt and
    criterion independently of everything else."""
    rng = random.Random(hashlib.sha256(("judge" + seed_text).encode()).digest())
    document = re.search(r"<document>\s*(.*?)\s*</document>", seed_text, re.S)
    linked = bool(CAUSAL.search(document.group(1))) if document else False
    out = {}
    for c in criteria:
        verdict = rng.random() >= (rates or {}).get(c, fail_rate)
        if c in LINK_CHECKS and link_pass_rate is not None:
            draw = random.Random(hashlib.sha256(f"link\x00{c}\x00{seed_text}".encode()).digest()).random()
            verdict = draw < link_pass_rate
        elif c in LINK_CHECKS:
            verdict = linked == LINK_CHECKS[c]
        out[c] = {"verdict": verdict, "reason": "checked against the unit"}
    return json.dumps(out)


def fake_assertions(prompt: str) -> str:
    """Two claims quoting the prompt's <unit> word for word, and one whose quote is invented."""
    unit = re.search(r"<unit>\s*(.*?)\s*</unit>", prompt, re.S)
    words = (unit.group(1) if unit else "the assistant tells the truth").split()
    quotes = [" ".join(words[:5]), " ".join(words[-5:])]
    return json.dumps([{"kind": "behaviour", "text": "It acts as the unit says.", "quote": quotes[0]},
                       {"kind": "value", "text": "It cares about what the unit names.", "quote": quotes[1]},
                       {"kind": "belief", "text": "An invented claim.", "quote": "words the unit never used"}])


def fake_ideas(prompt: str) -> str:
    """One idea per listed slot; the second slot's first idea is marked unsuitable, and a slot
    offered again in a top-up round repeats an existing idea once before proposing a new one."""
    slots = [int(n) for n in re.findall(r"^(\d+)\. genre: ", prompt, re.M)]
    existing = re.findall(r"^- (.+)$", prompt.split("Slots:")[0], re.M)
    out = []
    for n in slots:
        line = re.search(rf"^{n}\. genre: (.+)$", prompt, re.M).group(1)
        idea = f"A {line} piece about the case of {fake_text(prompt + str(n), 12).split('.')[0].lower()}"
        if n == 2 and not existing:
            out.append({"slot": n, "doc_type": "memo", "idea": idea, "suitable": False,
                        "why": "this genre would distort the unit"})
        elif existing and n == slots[0]:
            out.append({"slot": n, "doc_type": "memo", "idea": existing[0], "claim": 1, "suitable": True})
            out.append({"slot": n, "doc_type": "memo", "idea": idea, "claim": 1, "suitable": True})
        else:
            out.append({"slot": n, "doc_type": "memo", "idea": idea, "claim": 1, "suitable": True})
    return json.dumps(out)


def fake_list(prompt: str, what: str) -> str:
    """A JSON list of COUNT short strings: domain names, or questions (each ending in '?')."""
    count = re.search(r"^COUNT: (\d+)$", prompt, re.M)
    n = int(count.group(1)) if count else 5
    out = []
    for i in range(n):
        words = fake_text(f"{what}{i}" + prompt, 10 if what == "questions" else 3).split(".")[0].lower()
        out.append(f"How should {words}?" if what == "questions" else " ".join(words.split()[:3]))
    return json.dumps(out)


class LoopbackServer:
    """`with LoopbackServer(latency=0.5) as srv:` then point a client at `srv.url`."""

    def __init__(self, latency: float = 0.0, output_tokens: int = 64, faults: Faults | None = None, seed: int = 0,
                 api_key: str | None = None, min_cache_tokens: int = 1024, batch_latency: float = 0.2,
                 models: tuple[str, ...] = (), judge_fail_rate: float = 0.05, judge_garble_rate: float = 0.0,
                 one_prompt_per_request: bool = True, max_logprobs: int = 20, echo_shift: bool = False,
                 hidden_tokens: tuple[str, ...] = (), slots: int | None = None, stream_gap: float = 0.0,
                 stream_usage: bool = True, headers_first: bool = False):
        self.latency = latency  # seconds before an answer starts (a queue): before its headers, unless headers_first
        # llama.cpp's server takes one prompt per /v1/completions request and answers a list with HTTP 500
        self.one_prompt_per_request = one_prompt_per_request
        self.max_logprobs = max_logprobs  # a larger `logprobs` is HTTP 400, as vLLM's max_logprobs
        self.echo_shift = echo_shift  # llama.cpp: echo reports each prompt token's log-prob one position late
        self.hidden_tokens = set(hidden_tokens)  # never listed in top log-probs (an option the model finds unlikely)
        self.slots = slots  # GET /slots lists this many (llama.cpp); None: no such route (404)
        self.stream_gap = stream_gap  # seconds between the chunks of a streamed chat answer
        self.stream_usage = stream_usage  # False: no usage chunk even when asked (llama-cpp-python)
        self.headers_first = headers_first  # a streamed answer sends its headers at once, then waits `latency`
        self.scheduled = 0  # requests that have taken their place in faults.schedule
        self.stall_next = 0  # this many streamed answers go silent for faults.stall_s after their first chunk
        self.output_tokens = output_tokens
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.api_key = api_key
        self.min_cache_tokens = min_cache_tokens
        self.batch_latency = batch_latency
        self.models = models  # empty: every model name is accepted
        self.judge_fail_rate = judge_fail_rate
        self.causal_share = None  # documents' share of causal link words (see fake_text); None: 3 in 10
        self.length_spread = 0.0  # documents run output_tokens * (1 + up to this share), drawn per prompt
        self.judge_garble_rate = judge_garble_rate  # share of verdicts answered as prose, drawn per call
        self.criterion_fail_rates: dict[str, float] = {}  # per-criterion fail rates (e.g. include: 0.3)
        self.link_check_pass_rate: float | None = None  # set: LINK_CHECKS pass with this probability (fake_verdicts)
        self.planted: list[tuple[str, str]] = []  # (regex, answer): a prompt that matches gets that answer
        # True: a prompt asked again gets another sample, as a real model at temperature 1 gives (the
        # Messages API carries no seed, so replicate plan rows send identical prompts); False: one answer
        # per prompt, which tests of exact duplicates rely on
        self.vary_repeats = False
        self._asked: Counter = Counter()
        self.stats = ServerStats()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.prefix_cache: set[str] = set()
        self.batches: dict[str, dict] = {}
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> "LoopbackServer":
        handler = type("Handler", (_Handler,), {"server_ref": self})
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self.httpd, "server not started"
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    # ---- decisions ---------------------------------------------------------------------
    def draw_fault(self) -> str | None:
        with self.lock:
            if self.faults.schedule:
                fault = self.faults.schedule[self.scheduled % len(self.faults.schedule)]
                self.scheduled += 1
                if fault is not None:
                    self.stats.faults[fault] += 1
                return fault
            if self.faults.rate and self.rng.random() < self.faults.rate:
                fault = self.rng.choice(self.faults.kinds)
                self.stats.faults[fault] += 1
                return fault
        return None

    def cache_usage(self, model: str, prefix: str) -> tuple[int, int]:
        """(cache write tokens, cache read tokens) for a cacheable prefix, as the API bills them."""
        tokens = approx_tokens(prefix)
        if not prefix or tokens < self.min_cache_tokens:
            return 0, 0
        key = hashlib.sha256(f"{model}\n{prefix}".encode()).hexdigest()
        with self.lock:
            if key in self.prefix_cache:
                return 0, tokens
            self.prefix_cache.add(key)
        return tokens, 0

    def answer(self, prompt: str, max_tokens: int, stop: list[str], forced: str | None = None) -> tuple[str, str, str | None]:
        """(text, stop reason, matched stop sequence) for a prompt.

        It follows the formats msm asks for: JSON verdicts when the prompt lists CRITERIA, and
        a scratchpad then a <document> when the prompt asks for one.
        """
        if forced == "refusal" or "[refuse]" in prompt:
            return "", "refusal", None
        if self.vary_repeats:
            digest = hashlib.sha256(prompt.encode()).hexdigest()
            with self.lock:
                repeat = self._asked[digest]
                self._asked[digest] += 1
            if repeat:
                prompt = f"{prompt}\n[sample {repeat}]"
        criteria = re.search(r"^CRITERIA: (.+)$", prompt, re.M)
        reply = re.search(r"^REPLY: (assertions|ideas|domains|questions)$", prompt, re.M)
        planted = next((answer for pattern, answer in self.planted if re.search(pattern, prompt)), None)
        if planted is not None and not criteria:
            text = planted
        elif reply and reply.group(1) == "assertions":
            text = fake_assertions(prompt)
        elif reply and reply.group(1) in ("domains", "questions"):
            text = fake_list(prompt, reply.group(1))
        elif reply:
            text = fake_ideas(prompt)
        elif criteria and self.judge_garble_rate and self._draw() < self.judge_garble_rate:
            text = "I think this document is mostly fine, though " + fake_text(prompt, 20)
        elif criteria:
            text = fake_verdicts(prompt, [c.strip() for c in criteria.group(1).split(",")], self.judge_fail_rate,
                                 self.criterion_fail_rates, self.link_check_pass_rate)
        elif "<reasoning>" in prompt and "<response>" in prompt:
            text = (f"<reasoning>\n{fake_text('think' + prompt, 24)}\n</reasoning>\n"
                    f"<response>\n{fake_text(prompt, self.output_tokens)}\n</response>")
        elif "<document>" in prompt:
            spread = int.from_bytes(hashlib.sha256(("length" + prompt).encode()).digest()[:4], "big") / 2 ** 32
            body = fake_text(prompt, round(self.output_tokens * (1 + self.length_spread * spread)), self.causal_share)
            text = f"<scratchpad>\nAngle: {fake_text('plan' + prompt, 24)}\n</scratchpad>\n<document>\n{body}\n</document>"
        else:
            text = fake_text(prompt, self.output_tokens)
        reason = "end_turn"
        if approx_tokens(text) > max_tokens or forced == "truncate":
            text = text[: min(max_tokens * 4, max(4, len(text) // 2) if forced == "truncate" else max_tokens * 4)]
            reason = "max_tokens"
        for s in stop:
            if s and s in text:
                return text[: text.index(s)], "stop_sequence", s
        return text, reason, None

    def take_stall(self) -> bool:
        with self.lock:
            if self.stall_next > 0:
                self.stall_next -= 1
                self.stats.faults["stall"] += 1
                return True
        return False

    def top_logprobs(self, prefix: str, k: int) -> dict[str, float]:
        """The k most likely next tokens and their log-probs, hidden tokens left out."""
        ranked = sorted(((next_logprob(prefix, t), t) for t in VOCAB if t not in self.hidden_tokens), reverse=True)
        return {t: lp for lp, t in ranked[:k]}

    def echo_logprobs(self, prompt: str) -> tuple[list[str], list[int], list[float | None]]:
        """Each prompt token's log-prob given the text before it (the first has none). Shifted as
        llama.cpp does, each is instead read from the distribution after the token itself."""
        pieces = tokenize(prompt)
        values: list[float | None] = [None]
        for token, offset in pieces[1:]:
            given = prompt[:offset + len(token)] if self.echo_shift else prompt[:offset]
            values.append(next_logprob(given, token))
        return [t for t, _ in pieces], [o for _, o in pieces], values

    def _draw(self) -> float:
        with self.lock:
            return self.rng.random()

    def record_answer(self, prompt: str) -> None:
        with self.lock:
            self.stats.answered[hashlib.sha256(prompt.encode()).hexdigest()] += 1


class LoopbackProcess:
    """The loopback server in a process of its own, so timing a client does not share its GIL.

    `with LoopbackProcess(latency=0.5) as srv:` gives `srv.url` and `srv.stats()` (the counters).
    """

    def __init__(self, **server_kwargs):
        self.server_kwargs = server_kwargs
        self.process = None
        self.url = ""

    def __enter__(self) -> "LoopbackProcess":
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        self.process = ctx.Process(target=self.serve, args=(self.server_kwargs, ready), daemon=True)
        self.process.start()
        self.url = ready.get(timeout=60)
        if isinstance(self.url, Exception):  # the child could not start its server: raised here
            self.process.join(timeout=10)
            raise self.url
        return self

    def cpu_seconds(self) -> float:
        """CPU time the server's process has used so far (Linux /proc): benchmarks count every core."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(self.url + "/_stats", timeout=10) as reply:
            return json.loads(reply.read())

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.join(timeout=10)


def _serve(server_kwargs: dict, ready) -> None:
    """A LoopbackProcess child: serve until terminated."""
    server = LoopbackServer(**server_kwargs).start()
    ready.put(server.url)
    server.stopping.wait()


LoopbackProcess.serve = staticmethod(_serve)  # the child's entry point; a subclass names its own


def _anthropic_prompt(body: dict) -> tuple[str, str, str]:
    """(cacheable system prefix, rest of the system prompt, conversation text)."""
    system = body.get("system") or ""
    prefix, rest = "", ""
    if isinstance(system, str):
        rest = system
    else:
        blocks = [b.get("text", "") for b in system]
        marks = [i for i, b in enumerate(system) if b.get("cache_control")]
        cut = marks[-1] + 1 if marks else 0
        prefix, rest = "".join(blocks[:cut]), "".join(blocks[cut:])
    convo = []
    for m in body.get("messages", []):
        content = m.get("content", "")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content)
        convo.append(f"{m.get('role')}: {content}")
    return prefix, rest, "\n".join(convo)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, delayed ACKs add ~40 ms a call.
    disable_nagle_algorithm = True
    server_ref: LoopbackServer

    def log_message(self, *args) -> None:  # quiet
        pass

    # ---- plumbing ----------------------------------------------------------------------
    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw or b"{}")

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:16]}")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, kind: str, message: str, headers: dict | None = None, openai: bool = False) -> None:
        if openai:
            self._send(status, {"error": {"message": message, "type": kind, "code": None}}, headers)
        else:
            self._send(status, {"type": "error", "error": {"type": kind, "message": message}}, headers)

    def _authorized(self, openai: bool) -> bool:
        srv = self.server_ref
        if srv.api_key is None:
            return True
        # Anthropic's SDK sends x-api-key (older releases) or a bearer token (newer ones).
        given = {self.headers.get("x-api-key", ""), self.headers.get("Authorization", "").removeprefix("Bearer ")}
        if srv.api_key in given:
            return True
        self._error(401, "authentication_error", "invalid api key", openai=openai)
        return False

    def _fault(self, fault: str | None, openai: bool, stream: bool = False) -> bool:
        """Act out a transient fault; True when the request has been answered by it."""
        srv = self.server_ref
        if fault == "429":
            self._error(429, "rate_limit_error", "rate limited", {"retry-after": str(srv.faults.retry_after)}, openai)
        elif fault == "500":
            self._error(500, "api_error", "internal error", openai=openai)
        elif fault == "529":
            self._error(529, "overloaded_error", "overloaded", openai=openai)
        elif fault == "malformed" and stream:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = (b'data: {"id": "chatcmpl-br\n\n' if openai else
                     b'event: message_start\ndata: {"type": "message_start", "message": {"id": "msg_br\n\n')
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n")
        elif fault == "malformed":
            self._send(200, b'{"id": "msg_broken", "content": [{"type": "text", "text": "unterminated')
        elif fault == "hang":
            srv.stopping.wait(srv.faults.hang_s)
            self.close_connection = True
        else:
            return False
        return True

    def _model_ok(self, model: str | None, openai: bool) -> bool:
        srv = self.server_ref
        if not model:
            self._error(400, "invalid_request_error", "model: field required", openai=openai)
            return False
        if srv.models and model not in srv.models:
            self._error(404, "not_found_error", f"model: {model}", openai=openai)
            return False
        return True

    # ---- routes ------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802
        srv = self.server_ref
        path = self.path.split("?")[0]
        if path == "/_stats":  # loopback-only: lets a test or benchmark in another process read counters
            with srv.lock:
                self._send(200, {"requests": dict(srv.stats.requests), "faults": dict(srv.stats.faults),
                                 "answered": dict(srv.stats.answered), "batches_created": srv.stats.batches_created})
        elif path == "/slots" and srv.slots is not None:  # llama.cpp's server root, not under /v1
            if not self._authorized(openai=True):
                return
            srv.stats.requests["slots"] += 1
            self._send(200, [{"id": i, "is_processing": False} for i in range(srv.slots)])
        elif path == "/v1/models":
            if not self._authorized(openai=True):
                return
            srv.stats.requests["models"] += 1
            names = srv.models or ("loopback-model",)
            self._send(200, {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "loopback"} for m in names]})
        elif path.startswith("/v1/messages/batches/") and path.endswith("/results"):
            self._batch_results(path.split("/")[4])
        elif path.startswith("/v1/messages/batches/"):
            self._batch_status(path.split("/")[4])
        else:
            self._error(404, "not_found_error", f"no route {path}")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        try:
            body = self._body()
        except json.JSONDecodeError:
            self._error(400, "invalid_request_error", "body is not JSON")
            return
        if path == "/v1/messages":
            self._messages(body)
        elif path == "/v1/messages/batches":
            self._batch_create(body)
        elif path == "/v1/chat/completions":
            self._chat(body)
        elif path == "/v1/completions":
            self._completions(body)
        else:
            self._error(404, "not_found_error", f"no route {path}")

    # ---- Anthropic Messages --------------------------------------------------------------
    def _message_payload(self, body: dict, forced: str | None = None) -> dict:
        srv = self.server_ref
        prefix, rest, convo = _anthropic_prompt(body)
        write, read = srv.cache_usage(body["model"], prefix)
        uncached = approx_tokens(rest + convo) + (0 if (write or read) else approx_tokens(prefix))
        text, reason, matched = srv.answer(prefix + rest + convo, body["max_tokens"], body.get("stop_sequences") or [], forced)
        return {
            "id": f"msg_{uuid.uuid4().hex[:20]}", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": text}] if text else [],
            "stop_reason": reason, "stop_sequence": matched,
            "usage": {"input_tokens": uncached, "output_tokens": approx_tokens(text),
                      "cache_creation_input_tokens": write, "cache_read_input_tokens": read},
        }, prefix + rest + convo

    def _messages(self, body: dict) -> None:
        srv = self.server_ref
        srv.stats.requests["messages"] += 1
        if not self._authorized(openai=False) or not self._model_ok(body.get("model"), openai=False):
            return
        if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
            self._error(400, "invalid_request_error", "max_tokens: must be >= 1")
            return
        early = srv.faults.reject_first
        fault = srv.draw_fault() if early else None
        if fault in early and self._fault(fault, openai=False):
            return
        if srv.latency:
            time.sleep(srv.latency)
        if not early:
            fault = srv.draw_fault()
        if self._fault(fault, openai=False, stream=bool(body.get("stream"))):
            return
        message, prompt = self._message_payload(body, fault)
        if body.get("stream"):
            if not self._stream_message(message, stall=fault == "stall"):
                return
        else:
            self._send(200, message)
        srv.record_answer(prompt)

    def _stream_message(self, message: dict, stall: bool = False) -> bool:
        """Server-sent events in the Messages streaming format, chunked so the connection stays alive.
        With `stall`, the stream goes silent after its first events (see Faults.schedule): False."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        text = message["content"][0]["text"] if message["content"] else ""
        start = dict(message, content=[], stop_reason=None, stop_sequence=None,
                     usage=dict(message["usage"], output_tokens=1))
        events = [("message_start", {"type": "message_start", "message": start}),
                  ("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})]
        for i in range(0, len(text), 64):
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": text[i:i + 64]}}))
        events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]},
                                      "usage": {"output_tokens": message["usage"]["output_tokens"]}}),
                   ("message_stop", {"type": "message_stop"})]
        srv = self.server_ref
        try:
            for i, (name, data) in enumerate(events):
                if stall and i == 3:  # message_start, block start and one delta sent
                    srv.stopping.wait(srv.faults.stall_after)
                elif stall and i == 4:  # one more delta, then silence
                    srv.stopping.wait(srv.faults.stall_s)
                    self.close_connection = True
                    return False
                chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return False
        return True

    # ---- Anthropic Message Batches --------------------------------------------------------
    def _batch_view(self, batch: dict) -> dict:
        srv = self.server_ref
        ended = time.monotonic() - batch["t0"] >= srv.batch_latency
        counts = Counter(item["result"]["type"] for item in batch["results"])
        n = len(batch["results"])
        return {
            "id": batch["id"], "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {"processing": 0 if ended else n, "succeeded": counts["succeeded"] if ended else 0,
                               "errored": counts["errored"] if ended else 0, "canceled": 0,
                               "expired": counts["expired"] if ended else 0},
            "created_at": batch["created"], "expires_at": batch["created"], "ended_at": batch["created"] if ended else None,
            "archived_at": None, "cancel_initiated_at": None,
            "results_url": f"{srv.url}/v1/messages/batches/{batch['id']}/results" if ended else None,
        }

    def _batch_create(self, body: dict) -> None:
        srv = self.server_ref
        srv.stats.requests["batch_create"] += 1
        if not self._authorized(openai=False):
            return
        results = []
        for item in body.get("requests", []):
            params = item["params"]
            with srv.lock:
                draw = srv.rng.random()
            if srv.faults.batch_item_rate and draw < srv.faults.batch_item_rate:
                kind = "errored" if draw < srv.faults.batch_item_rate / 2 else "expired"
                result = ({"type": "errored", "error": {"type": "error", "error": {"type": "api_error", "message": "item failed"}}}
                          if kind == "errored" else {"type": "expired"})
                srv.stats.faults[f"batch_{kind}"] += 1
            else:
                message, prompt = self._message_payload(params)
                srv.record_answer(prompt)
                result = {"type": "succeeded", "message": message}
            results.append({"custom_id": item["custom_id"], "result": result})
        batch_id = f"msgbatch_{uuid.uuid4().hex[:24]}"
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        batch = {"id": batch_id, "t0": time.monotonic(), "created": created, "results": results}
        with srv.lock:
            srv.batches[batch_id] = batch
            srv.stats.batches_created += 1
        self._send(200, self._batch_view(batch))

    def _find_batch(self, batch_id: str, route: str) -> dict | None:
        srv = self.server_ref
        srv.stats.requests[route] += 1
        if not self._authorized(openai=False):
            return None
        batch = srv.batches.get(batch_id)
        if batch is None:
            self._error(404, "not_found_error", f"batch {batch_id} not found")
        return batch

    def _batch_status(self, batch_id: str) -> None:
        if (batch := self._find_batch(batch_id, "batch_status")) is not None:
            self._send(200, self._batch_view(batch))

    def _batch_results(self, batch_id: str) -> None:
        if (batch := self._find_batch(batch_id, "batch_results")) is None:
            return
        lines = "\n".join(json.dumps(r) for r in batch["results"]).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/binary")
        self.send_header("Content-Length", str(len(lines)))
        self.end_headers()
        self.wfile.write(lines)

    # ---- OpenAI-compatible ------------------------------------------------------------------
    def _chat(self, body: dict) -> None:
        srv = self.server_ref
        srv.stats.requests["chat"] += 1
        if not self._authorized(openai=True) or not self._model_ok(body.get("model"), openai=True):
            return
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
        if max_tokens < 1:
            self._error(400, "invalid_request_error", "max_tokens must be at least 1", openai=True)
            return
        stream = bool(body.get("stream"))
        if srv.latency and not (stream and srv.headers_first):
            time.sleep(srv.latency)
        fault = srv.draw_fault()
        if self._fault(fault, openai=True, stream=stream):
            return
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in body.get("messages", []))
        stop = body.get("stop") or []
        text, reason, _ = srv.answer(prompt, max_tokens, [stop] if isinstance(stop, str) else stop, fault)
        finish = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "refusal": "content_filter"}[reason]
        usage = {"prompt_tokens": approx_tokens(prompt), "completion_tokens": approx_tokens(text),
                 "total_tokens": approx_tokens(prompt) + approx_tokens(text),
                 "prompt_tokens_details": {"cached_tokens": 0}}
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:20]}", "created": int(time.time()), "model": body["model"]}
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and srv.stream_usage
            if not self._stream_chat(head, text, finish, usage if include_usage else None):
                return
        else:
            self._send(200, {**head, "object": "chat.completion",
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": finish, "logprobs": None}], "usage": usage})
        srv.record_answer(prompt)

    def _stream_chat(self, head: dict, text: str, finish: str, usage: dict | None) -> bool:
        """Chat completion chunks as server-sent events, one word per chunk, `stream_gap` apart; False
        when the client hung up first (counted as abandoned: its connection was closed)."""
        srv = self.server_ref
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(choices: list, extra: dict | None = None) -> bytes:
            data = {**head, "object": "chat.completion.chunk", "choices": choices, **(extra or {})}
            return f"data: {json.dumps(data)}\n\n".encode()

        words = re.findall(r"\S*\s*", text)[:-1] or []
        try:
            self.wfile.flush()
            if srv.headers_first and srv.latency:
                srv.stopping.wait(srv.latency)
            self._chunk(event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
            for i, word in enumerate(words):
                if i == 1 and srv.take_stall():
                    srv.stopping.wait(srv.faults.stall_s)
                elif i and srv.stream_gap:
                    srv.stopping.wait(srv.stream_gap)
                self._chunk(event([{"index": 0, "delta": {"content": word}, "finish_reason": None}]))
            self._chunk(event([{"index": 0, "delta": {}, "finish_reason": finish}]))
            if usage is not None:
                self._chunk(event([], {"usage": usage}))
            self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            with srv.lock:
                srv.stats.requests["chat_abandoned"] += 1
            self.close_connection = True
            return False
        return True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _completions(self, body: dict) -> None:
        """Legacy completions, as vLLM and llama.cpp serve them: the next token's `top_logprobs`
        (`logprobs=K`), or with `echo` the prompt's own log-probs. One prompt per request, when told."""
        srv = self.server_ref
        srv.stats.requests["completions"] += 1
        if not self._authorized(openai=True) or not self._model_ok(body.get("model"), openai=True):
            return
        prompts = body.get("prompt")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if srv.one_prompt_per_request and len(prompts) > 1:
            self._error(500, "server_error", "'list' object has no attribute 'encode'", openai=True)  # llama.cpp's
            return
        k = body.get("logprobs")
        if k is not None and k > srv.max_logprobs:
            self._error(400, "invalid_request_error", f"Requested sample logprobs of {k}, which is greater than "
                        f"max allowed: {srv.max_logprobs}", openai=True)
            return
        if srv.latency:
            time.sleep(srv.latency)
        fault = srv.draw_fault()
        if fault in TRANSIENT_FAULTS and self._fault(fault, openai=True):
            return
        echo = bool(body.get("echo"))
        choices = [self._completion_choice(index, prompt, k, echo) for index, prompt in enumerate(prompts)]
        n_tokens = sum(len(tokenize(p)) for p in prompts)
        self._send(200, {"id": f"cmpl-{uuid.uuid4().hex[:20]}", "object": "text_completion", "created": int(time.time()),
                         "model": body["model"], "choices": choices,
                         "usage": {"prompt_tokens": n_tokens, "completion_tokens": len(choices),
                                   "total_tokens": n_tokens + len(choices)}})
        with srv.lock:
            srv.stats.requests["completions_answered"] += 1  # sent whole: a paid scoring call

    def _completion_choice(self, index: int, prompt: str, k: int | None, echo: bool) -> dict:
        """One greedy next token; with `logprobs`, its log-prob and the top k (plus the chosen one, as
        llama.cpp and vLLM list it); with `echo`, the prompt's tokens and log-probs come first."""
        srv = self.server_ref
        ranked = srv.top_logprobs(prompt, len(VOCAB))
        token, lp = next(iter(ranked.items()))
        text = (prompt if echo else "") + token
        if k is None:
            return {"index": index, "text": text, "finish_reason": "length", "logprobs": None}
        tokens, offsets, values, tops = [], [], [], []
        if echo:
            tokens, offsets, values = srv.echo_logprobs(prompt)
            tops = [None] + [{} for _ in tokens[1:]]
        top = dict(list(ranked.items())[:k])
        top[token] = lp
        return {"index": index, "text": text, "finish_reason": "length",
                "logprobs": {"tokens": [*tokens, token], "token_logprobs": [*values, lp],
                             "text_offset": [*offsets, len(prompt)], "top_logprobs": [*tops, top]}}
