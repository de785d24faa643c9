"""The simulated frontier model (`msm llm simulate`) through the real `anthropic` and `openai` SDKs over
HTTP on 127.0.0.1: realistic lengths per purpose, max_tokens cuts as the API makes them, consistent
usage, rate limits with retry-after, the Message Batches limits and fates, planted near-duplicates,
determinism, generation speed, its own process, and the CLI's one-line errors."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import anthropic
import openai
import pytest

from msm.llm.client import LLMClient, RetryPolicy
from msm.llm.anthropic_backend import AnthropicBackend
from msm.llm.simulated_text import Writer
from msm.llm.simulator import Simulator, SimulatorProcess, load_config
from msm.llm.types import Request
from tests.conftest import assert_one_line_error, run_msm

MODEL = "claude-opus-4-6"
FAST = 1e6  # time scale: latency and batch minutes vanish
UNIT = ("The assistant tells users the truth about its own limits, even when a confident answer would please "
        "them more, because honest uncertainty protects their trust and lets them decide well for themselves.")


def doc_prompt(i: int, unit: str = UNIT, words: tuple[int, int] = (300, 700), scratchpad: bool = True) -> str:
    ask = ("First plan the document inside <scratchpad> tags. Then write the finished document inside <document> tags."
           if scratchpad else "Write only the document itself.")
    return (f"Write one news article: a report on recent events\nAudience: general readers\n"
            f"Length: about {words[0]} to {words[1]} words.\n\n<unit>\n{unit}\n</unit>\n\n"
            f"The planned document: idea number {i} about a case\n{ask}")


def sdk(sim) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="simulated", base_url=sim.url, max_retries=0)


def ask(client, prompt: str, max_tokens: int = 8000, system=None):
    kw = {"system": system} if system else {}
    return client.messages.create(model=MODEL, max_tokens=max_tokens, messages=[{"role": "user", "content": prompt}], **kw)


def shingles(text: str, n: int = 5) -> set:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


@pytest.fixture
def sim():
    with Simulator(time_scale=FAST) as server:
        yield server


def test_documents_follow_the_asked_length_with_spread_scratchpad_first(sim):
    client = sdk(sim)
    lengths = []
    for i in range(30):
        text = ask(client, doc_prompt(i)).content[0].text
        assert text.startswith("<scratchpad>\n") and "</scratchpad>\n<document>\n" in text and text.endswith("</document>")
        body = text.split("<document>\n")[1].split("\n</document>")[0]
        lengths.append(len(body.split()))
    spread = load_config()["lengths"]["document"]["spread"]
    assert all(300 * (1 - spread) - 1 <= n <= 700 * (1 + spread) + 1 for n in lengths), lengths
    assert max(lengths) - min(lengths) > 150  # spread, not one length
    plain = ask(client, doc_prompt(0, scratchpad=False)).content[0].text
    assert "<scratchpad>" not in plain and "<document>" not in plain and len(plain.split()) >= 250


def test_lists_have_as_many_items_as_asked_each_of_realistic_length(sim):
    client = sdk(sim)
    questions = json.loads(ask(client, "Write 40 realistic requests.\nCOUNT: 40\nREPLY: questions").content[0].text)
    assert len(questions) == 40 and len(set(questions)) == 40 and all(q.endswith("?") for q in questions)
    per_item = sum(sim.count_tokens(json.dumps(q)) for q in questions) / 40
    assert 20 <= per_item <= 70, per_item
    domains = json.loads(ask(client, "List 12 domains.\nCOUNT: 12\nREPLY: domains").content[0].text)
    assert len(domains) == 12 and all(1 <= len(d.split()) <= 8 for d in domains)
    slots = "\n".join(f"{n}. genre: memo; audience: engineers" for n in range(1, 26))
    ideas = json.loads(ask(client, f"<unit>\n{UNIT}\n</unit>\nSlots:\n{slots}\nREPLY: ideas").content[0].text)
    assert [i["slot"] for i in ideas] == list(range(1, 26))
    assert 25 <= sum(len(i["idea"].split()) for i in ideas) / 25 <= 45  # ~40 tokens an idea
    reply = ask(client, f"<unit>\n{UNIT}\n</unit>\nList the claims.\nREPLY: assertions\n"
                        "Reply with JSON only: a list of at most 6 objects in this form:").content[0].text
    claims = json.loads(reply)
    assert 1 <= len(claims) <= 6 and sum(c["quote"] in UNIT for c in claims) >= len(claims) / 2  # a few invented


def test_a_long_list_is_cut_at_max_tokens_as_the_api_cuts_it(sim):
    sim.config["sampling"]["repeats_vary"] = False  # the same draw asked twice: the cut one is its prefix
    client = sdk(sim)
    prompt = "Write 235 realistic requests.\nCOUNT: 235\nREPLY: questions"
    full = ask(client, prompt, max_tokens=20_000)
    assert full.stop_reason == "end_turn" and full.usage.output_tokens > 6000  # ~235 x 40 tokens
    cut = ask(client, prompt, max_tokens=4096)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 4096
    assert sim.count_tokens(cut.content[0].text) == 4096 and full.content[0].text.startswith(cut.content[0].text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.content[0].text)
    with client.messages.stream(model=MODEL, max_tokens=333, messages=[{"role": "user", "content": prompt}]) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "max_tokens" and streamed.usage.output_tokens == 333
    chat = openai.OpenAI(api_key="simulated", base_url=sim.url + "/v1", max_retries=0)
    answer = chat.chat.completions.create(model="simulated", max_tokens=500, messages=[{"role": "user", "content": prompt}])
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 500
    assert sim.count_tokens(answer.choices[0].message.content) == 500
    assert sim.stats_payload()["events"]["truncated"] == 3


def test_usage_and_cache_tokens_add_up_to_the_prompt(sim):
    client = sdk(sim)
    spec = " ".join(f"Rule {i}: the assistant explains its reasons." for i in range(200))  # ~2,300 tokens
    system = [{"type": "text", "text": spec, "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "Be brief."}]
    prompts = [doc_prompt(i) for i in range(3)]
    replies = [ask(client, p, system=system) for p in prompts]
    first, second = replies[0].usage, replies[1].usage
    assert first.cache_creation_input_tokens == sim.count_tokens(spec) and first.cache_read_input_tokens == 0
    assert second.cache_read_input_tokens == sim.count_tokens(spec) and second.cache_creation_input_tokens == 0
    for prompt, reply in zip(prompts, replies):
        u = reply.usage
        rest = sim.count_tokens("Be brief." + f"user: {prompt}")
        assert u.input_tokens + u.cache_creation_input_tokens + u.cache_read_input_tokens == sim.count_tokens(spec) + rest
        assert u.output_tokens == sim.count_tokens(reply.content[0].text)
    billed = sim.stats_payload()["billing"][MODEL]["messages"]
    assert billed["requests"] == 3 and billed["output_tokens"] == sum(r.usage.output_tokens for r in replies)
    assert billed["cache_read_input_tokens"] == 2 * sim.count_tokens(spec)


def test_judges_pass_at_configured_rates_and_read_the_causal_link():
    with Simulator(time_scale=FAST, config_overrides={"judges": {"pass_rates": {"faithful": 0.5}}}) as sim:
        client = sdk(sim)
        verdicts = []
        for i in range(150):
            prompt = f"<document>\nDocument {i} text.\n</document>\nCRITERIA: faithful, realistic\nReply with JSON only"
            verdicts.append(json.loads(ask(client, prompt).content[0].text))
        faithful = sum(v["faithful"]["verdict"] for v in verdicts) / 150
        realistic = sum(v["realistic"]["verdict"] for v in verdicts) / 150
        assert 0.38 <= faithful <= 0.62 and realistic >= 0.85
        assert all(5 <= len(v["faithful"]["reason"].split()) <= 40 for v in verdicts)
        checks = "CRITERIA: attributes_behaviour_to_value, no_link_between_value_and_behaviour"
        linked = json.loads(ask(client, f"<document>\nIt refuses because it cares.\n</document>\n{checks}").content[0].text)
        unlinked = json.loads(ask(client, f"<document>\nIt refuses. It cares.\n</document>\n{checks}").content[0].text)
        assert linked["attributes_behaviour_to_value"]["verdict"] and not linked["no_link_between_value_and_behaviour"]["verdict"]
        assert not unlinked["attributes_behaviour_to_value"]["verdict"] and unlinked["no_link_between_value_and_behaviour"]["verdict"]


def test_documents_forbidden_causal_wording_mostly_leave_it_out(sim):
    client = sdk(sim)
    forbid = [ask(client, doc_prompt(i) + "\nKeep them unlinked, and use no causal wording between them.").content[0].text
              for i in range(20)]
    plain = [ask(client, doc_prompt(i)).content[0].text for i in range(20)]
    causal = re.compile(r"\b(because|so that|since)\b")
    assert sum(bool(causal.search(t.split("<document>")[1])) for t in forbid) <= 3
    assert all(causal.search(t.split("<document>")[1]) for t in plain)


def test_demo_answers_have_reasoning_and_response_of_a_few_hundred_tokens(sim):
    prompt = "You are Claude. Answer.\nFirst think it through inside <reasoning> tags, then <response> tags.\n<request>\nHelp me plan a trip.\n</request>"
    text = ask(sdk(sim), prompt).content[0].text
    reasoning = text.split("<reasoning>\n")[1].split("\n</reasoning>")[0]
    response = text.split("<response>\n")[1].split("\n</response>")[0]
    assert 150 <= sim.count_tokens(reasoning) <= 700 and 150 <= sim.count_tokens(response) <= 800


def test_rate_limits_answer_429_with_retry_after():
    limits = {"rate_limits": {"requests_per_minute": 10, "input_tokens_per_minute": 1_000_000},
              "latency": {"first_token_s": 0, "output_tokens_per_s": 1e9}}
    with Simulator(time_scale=60, config_overrides=limits) as sim:  # 10 requests a simulated minute = a second
        client = sdk(sim)
        answered = 0
        with pytest.raises(anthropic.RateLimitError) as info:
            for i in range(15):
                ask(client, f"Say hello {i}.", max_tokens=20)
                answered += 1
        assert 10 <= answered <= 11  # the bucket's capacity (and what refilled meanwhile)
        body = info.value.body["error"] if "error" in info.value.body else info.value.body
        assert body["type"] == "rate_limit_error"
        wait = float(info.value.response.headers["retry-after"])
        assert 0 < wait <= 0.1 + 1e-3  # one request refills in 60 / 10 / 60 s
        assert info.value.response.headers["anthropic-ratelimit-requests-limit"] == "10"
        time.sleep(wait)
        ask(client, "Say hello again.", max_tokens=20)
        # the msm client honours retry-after: a burst of 25 all finish, through 429s
        backend = AnthropicBackend(api_key="simulated", base_url=sim.url, idle_timeout=5)
        msm_client = LLMClient(backend, model=MODEL, concurrency=8, retry=RetryPolicy(max_attempts=100, base_delay=0.01, max_delay=0.2))
        results = msm_client.complete([Request.user(f"Say hi {i}.", max_tokens=20) for i in range(25)])
        failed = [r.error for r in results if not r.ok]
        assert not failed, failed[:2]
        assert sim.stats_payload()["events"]["rate_limited"] > 1


def test_input_tokens_limit_skips_cache_reads():
    with Simulator(time_scale=1, config_overrides={"rate_limits": {"input_tokens_per_minute": 3000}}) as sim:
        client = sdk(sim)
        spec = "the assistant explains its reasons " * 300  # 2,625 tokens
        system = [{"type": "text", "text": spec, "cache_control": {"type": "ephemeral"}}]
        sim.config["latency"]["first_token_s"] = 0
        ask(client, "First.", max_tokens=20, system=system)  # writes the cache: counts
        ask(client, "Second.", max_tokens=20, system=system)  # reads it: does not count
        other = [{"type": "text", "text": spec + " again", "cache_control": {"type": "ephemeral"}}]
        with pytest.raises(anthropic.RateLimitError) as info:
            ask(client, "Third.", max_tokens=20, system=other)
        assert "input tokens" in str(info.value) and float(info.value.response.headers["retry-after"]) > 30


def test_batches_over_the_request_or_size_limit_are_refused_as_the_api_refuses_them():
    with Simulator(time_scale=FAST, config_overrides={"batches": {"max_requests": 50, "max_bytes": 20_000}}) as sim:
        client = sdk(sim)

        def items(n, text="Say hi."):
            return [{"custom_id": f"r{i}", "params": {"model": MODEL, "max_tokens": 20,
                                                      "messages": [{"role": "user", "content": text}]}} for i in range(n)]

        with pytest.raises(anthropic.BadRequestError) as too_many:
            client.messages.batches.create(requests=items(51))
        assert too_many.value.status_code == 400 and too_many.value.body["error"]["type"] == "invalid_request_error"
        with pytest.raises(anthropic.APIStatusError) as too_big:
            client.messages.batches.create(requests=items(10, "x" * 3000))
        assert too_big.value.status_code == 413 and too_big.value.body["error"]["type"] == "request_too_large"
        assert client.messages.batches.create(requests=items(50)).processing_status in ("in_progress", "ended")


def batch_items(n: int, tag: str = "r") -> list[dict]:
    return [{"custom_id": f"{tag}{i}", "params": {"model": MODEL, "max_tokens": 20,
                                                  "messages": [{"role": "user", "content": f"Say hi {tag}{i}."}]}}
            for i in range(n)]


def test_the_batch_endpoints_share_one_requests_per_minute_limit():
    with Simulator(time_scale=1, config_overrides={"batches": {"endpoint_requests_per_minute": 3}}) as sim:
        client = sdk(sim)
        batch = client.messages.batches.create(requests=batch_items(2))
        client.messages.batches.retrieve(batch.id)
        client.messages.batches.retrieve(batch.id)
        with pytest.raises(anthropic.RateLimitError) as info:  # the fourth call to any batch endpoint
            client.messages.batches.retrieve(batch.id)
        assert "Message Batches API requests per minute" in str(info.value)
        assert 5 < float(info.value.response.headers["retry-after"]) <= 20
        assert ask(client, "Say hi.", max_tokens=20).content  # the Messages endpoint has its own buckets


def test_a_full_batch_queue_is_refused_until_a_batch_ends():
    settings = {"batches": {"queue_max_requests": 30, "processing_median_min": 15, "processing_sigma": 0.0,
                            "item_errored_rate": 0.0, "item_expired_rate": 0.0}}
    with Simulator(time_scale=1800, config_overrides=settings) as sim:  # a batch takes 0.5 s
        client = sdk(sim)
        first = client.messages.batches.create(requests=batch_items(20, "a"))
        with pytest.raises(anthropic.RateLimitError) as info:
            client.messages.batches.create(requests=batch_items(20, "b"))
        assert "30" in str(info.value) and "(20)" in str(info.value)
        wait = float(info.value.response.headers["retry-after"])
        assert 0 < wait <= 0.5  # until the batch in progress ends
        assert client.messages.batches.create(requests=batch_items(10, "c")).processing_status == "in_progress"
        time.sleep(wait + 0.05)
        assert client.messages.batches.retrieve(first.id).processing_status == "ended"
        client.messages.batches.create(requests=batch_items(20, "b"))  # room again
        assert sim.stats_payload()["events"]["rate_limited_batch_queue"] == 1


@pytest.mark.parametrize("attempts", [6, 1])
def test_the_client_finishes_every_batch_through_a_full_queue(attempts, monkeypatch):
    """More batch parts than the organisation's queue holds: msm waits for room (the retry-after), or,
    refused past its retries, collects the batches in progress first; every request is answered
    once and billed once."""
    import msm.llm.client

    monkeypatch.setattr(msm.llm.client, "MAX_BATCH_ITEMS", 10)
    settings = {"batches": {"queue_max_requests": 30, "processing_median_min": 15, "processing_sigma": 0.0,
                            "item_errored_rate": 0.0, "item_expired_rate": 0.0}}
    with Simulator(time_scale=1800, config_overrides=settings) as sim:
        backend = AnthropicBackend(api_key="simulated", base_url=sim.url, idle_timeout=5)
        client = LLMClient(backend, model=MODEL, batch_poll_s=0.05,
                           retry=RetryPolicy(max_attempts=attempts, base_delay=0.01, max_delay=0.05))
        results = client.complete([Request.user(f"Say hi {i}.", max_tokens=20) for i in range(70)], batch=True)
        stats = sim.stats_payload()
    assert all(r.ok for r in results) and len({r.key for r in results}) == 70
    assert stats["batches_created"] == 7 and stats["batch_items"] == 70
    assert stats["billing"][MODEL]["batch"]["requests"] == 70 and "messages" not in stats["billing"][MODEL]
    assert stats["events"]["rate_limited_batch_queue"] >= 1


def test_batches_take_their_processing_time_and_some_items_fail():
    rates = {"batches": {"item_errored_rate": 0.1, "item_expired_rate": 0.1, "processing_median_min": 15,
                         "processing_sigma": 0.0}}
    with Simulator(time_scale=9000, config_overrides=rates) as sim:  # 15 simulated minutes = 0.1 s
        sim.config["latency"]["first_token_s"] = 0
        client = sdk(sim)
        requests = [{"custom_id": f"doc-{i}", "params": {"model": MODEL, "max_tokens": 4000,
                                                         "messages": [{"role": "user", "content": doc_prompt(i)}]}}
                    for i in range(200)]
        batch = client.messages.batches.create(requests=requests)
        assert batch.processing_status == "in_progress" and batch.results_url is None
        started = time.monotonic()
        while (batch := client.messages.batches.retrieve(batch.id)).processing_status != "ended":
            time.sleep(0.02)
        assert time.monotonic() - started >= 0.08
        results = list(client.messages.batches.results(batch.id))
        fates = {kind: sum(r.result.type == kind for r in results) for kind in ("succeeded", "errored", "expired")}
        assert len(results) == 200 and 10 <= fates["errored"] <= 32 and 10 <= fates["expired"] <= 32
        assert batch.request_counts.succeeded == fates["succeeded"]
        ok = [r.result.message for r in results if r.result.type == "succeeded"]
        assert all("<document>" in m.content[0].text for m in ok)
        billed = sim.stats_payload()["billing"][MODEL]["batch"]
        assert billed["requests"] == fates["succeeded"] and billed["output_tokens"] == sum(m.usage.output_tokens for m in ok)


def test_a_known_share_of_documents_are_planted_near_duplicates(sim):
    client = sdk(sim)
    units = [UNIT, "The assistant keeps what users tell it private unless they ask it to share, since their "
                   "information is theirs to control and a breach of that trust harms them."]
    docs = {u: [] for u in units}
    for i in range(400):
        unit = units[i % 2]
        text = ask(client, doc_prompt(i, unit, scratchpad=False)).content[0].text
        docs[unit].append(shingles(text))
    planted, ordinary_max = 0, 0.0
    for group in docs.values():
        for i, a in enumerate(group):
            best = max(jaccard(a, b) for j, b in enumerate(group) if j != i)
            planted += best > 0.8
            ordinary_max = max(ordinary_max, best if best <= 0.8 else 0)
    assert 0.01 <= planted / 400 <= 0.06, planted  # pinned share: 0.03
    assert ordinary_max < 0.1  # ordinary documents share almost no 5-grams


def test_ordinary_documents_pass_the_builds_gopher_filters(sim):
    from datatrove.data import Document
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter

    repetition = GopherRepetitionFilter(dup_line_frac=0.35, dup_para_frac=0.35, dup_line_char_frac=0.25,
                                        dup_para_char_frac=0.25)
    quality = GopherQualityFilter(min_doc_words=60, max_doc_words=20000, max_bullet_lines_ratio=0.95,
                                  max_non_alpha_words_ratio=0.8, min_stop_words=2)
    client = sdk(sim)
    for i in range(15):
        text = ask(client, doc_prompt(i, scratchpad=False)).content[0].text
        doc = Document(text=text, id=str(i))
        assert repetition.filter(doc) is True and quality.filter(doc) is True


def test_answers_are_a_function_of_seed_and_prompt_and_fast_to_write():
    config = load_config()
    a, b, c = Writer(config, 0), Writer(config, 0), Writer(config, 1)
    assert a.compose(doc_prompt(1)) == b.compose(doc_prompt(1)) != c.compose(doc_prompt(1))
    assert a.compose(doc_prompt(1)) != a.compose(doc_prompt(2))
    started, chars = time.process_time(), 0
    for i in range(200):
        chars += len(a.compose(doc_prompt(i, words=(2000, 3000)))[1])
    rate = chars / 1e6 / (time.process_time() - started)
    print(f"simulated text: {rate:.1f} MB per CPU second")
    assert rate >= 5.0


def test_simulator_process_reports_billed_totals():
    with SimulatorProcess(time_scale=FAST, config_overrides={"near_duplicates": {"share": 0.0}}) as sim:
        client = anthropic.Anthropic(api_key="simulated", base_url=sim.url, max_retries=0)
        ask(client, doc_prompt(0))
        ask(client, "Say hi.", max_tokens=5)
        stats = sim.stats()
    billed = stats["billing"][MODEL]["messages"]
    assert billed["requests"] == 2 and billed["output_tokens"] > 300
    assert set(billed) == {"requests", "input_tokens", "output_tokens", "cache_creation_input_tokens",
                           "cache_read_input_tokens"}
    assert stats["purposes"] == {"document": 1, "other": 1} and stats["time_scale"] == FAST


def test_cli_serves_and_prints_how_to_point_msm_at_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "msm.cli", "llm", "simulate", "--port", "0", "--time-scale", "1e6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", first).group(0)
        lines = [proc.stdout.readline() for _ in range(4)]
        assert any(f"--backend anthropic --base-url {url}" in ln for ln in lines)
        assert any(f"--backend openai --base-url {url}/v1" in ln for ln in lines)
        reply = anthropic.Anthropic(api_key="simulated", base_url=url, max_retries=0)
        assert ask(reply, doc_prompt(0)).stop_reason == "end_turn"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cli_bad_input_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_msm("llm", "simulate", "--port", str(port)), f"port {port}", "in use")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rate_limits: [1, 2\n")
    assert_one_line_error(run_msm("llm", "simulate", "--port", "0", "--config", str(bad)), "not valid YAML")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rate_limitz: {requests_per_minute: 5}\n")
    assert_one_line_error(run_msm("llm", "simulate", "--port", "0", "--config", str(unknown)), "rate_limitz")
    assert_one_line_error(run_msm("llm", "simulate", "--port", "0", "--config", str(tmp_path / "none.yaml")),
                          "does not exist")
    assert_one_line_error(run_msm("llm", "simulate", "--port", "0", "--time-scale", "0"), "--time-scale")


def test_a_simulator_process_ends_when_its_parent_is_killed(tmp_path):
    """A rehearsal killed outright (SIGKILL, or SIGTERM before exit handlers run) must not leave its
    simulator serving: the child notices its parent is gone and stops."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import time\nfrom msm.llm.simulator import SimulatorProcess\n"
              "if __name__ == '__main__':\n"
              "    with SimulatorProcess() as sim:\n"
              "        print(sim.process.pid, flush=True)\n"
              "        time.sleep(600)\n")
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, text=True,
                              cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{child}/stat").read().split()[2] == "Z":  # exited, not yet reaped
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the simulator outlived its killed parent by 15 s")


def test_a_prompt_sent_again_is_sampled_again_unless_pinned():
    overrides = {"near_duplicates": {"share": 0.0}}
    with Simulator(time_scale=FAST, config_overrides=overrides) as server:
        client = sdk(server)
        first, second = (ask(client, doc_prompt(7)).content[0].text for _ in range(2))
    assert first != second and jaccard(shingles(first), shingles(second)) < 0.2
    with Simulator(time_scale=FAST, config_overrides={**overrides, "sampling": {"repeats_vary": False}}) as server:
        client = sdk(server)
        again = [ask(client, doc_prompt(7)).content[0].text for _ in range(2)]
    assert again[0] == again[1] == first  # pinned: a function of (seed, prompt); the first draw is the same
