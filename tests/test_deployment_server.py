"""Unit tests of the deployment HTTP server against a small fake `Replica` (no torch, no model).

They prove the seam: `server.py` works with anything that implements `replica.Replica`, and the wire
layer (validation, detokenization, stop strings, SSE, perf_metrics, snapshot identity, body limits,
error shapes) behaves the same whatever engine is behind it. The real engine is covered end to end
in test_deployment_process.py.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from starlette.testclient import TestClient

from workbench.backend.deployment.replica import (FinalEvent, GenerationRequest, HotloadError, HotloadRequest,
                                                  ModelInfo, Replica, TokenEvent, TokenInfo)
from workbench.backend.deployment.server import create_app

KEY = {"X-Api-Key": "k"}
MODEL = "accounts/acct/deployments/fake"


class CharTokenizer:
    """One token per character: id = ord(c) for c < 128. Enough for the wire layer."""

    def encode(self, text, add_special_tokens=False):
        return [ord(ch) % 128 for ch in text]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(i) for i in ids)


class FakeReplica:
    """Generates `script` (a string) token by token from a thread, one TokenEvent per token when the
    request streams; tags tokens with the held snapshot; hot loads just change the identity."""

    deployment_id, account, base_model = "fake", "acct", "fake-base"

    def __init__(self, script="hello world. bye", ready=True):
        self.script = script
        self._ready = ready
        self.identity: str | None = None
        self.cancelled: list = []
        self.hotloads: list[HotloadRequest] = []
        self.submitted: list[GenerationRequest] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next: str | None = None

    ready = property(lambda self: self._ready)
    startup_error = property(lambda self: None)
    current_identity = property(lambda self: self.identity)

    def model_info(self):
        return ModelInfo(self.base_model, CharTokenizer(), 128, 64) if self._ready else None

    def health(self):
        return {"active": 0}

    def status(self):
        return {"replicas": [{"replica_id": "fake-0", "current_snapshot_identity": self.identity,
                              "readiness": self._ready, "loading_state": {"stage": "done"}}]}

    def hotload(self, req: HotloadRequest):
        self.hotloads.append(req)
        if req.identity == "broken":
            raise HotloadError(422, "snapshot 'broken' is corrupt")
        self.identity = req.identity
        return {"status": "ok", "identity": req.identity}

    def submit(self, req: GenerationRequest, sink):
        self.submitted.append(req)
        handle = {"cancelled": False}
        error, self.fail_next = self.fail_next, None
        threading.Thread(target=self._run, args=(req, sink, handle, error), daemon=True).start()
        return handle

    def cancel(self, handle):
        handle["cancelled"] = True
        self.cancelled.append(handle)

    def start(self):
        pass

    def stop(self):
        pass

    def _run(self, req, sink, handle, error):
        self.gate.wait(30)
        p = req.params
        snaps = [self.identity]
        echo = [TokenInfo(t, -1.0, None, []) for t in req.prompt_ids[len(req.prompt_ids) - p.echo_count:]] \
            if p.echo_count else []
        out, reason = [], "length"
        if error:
            sink.on_events([FinalEvent(handle, "error", [], echo, {}, snaps, error)])
            return
        for i, ch in enumerate(self.script[:p.max_tokens]):
            if handle["cancelled"]:
                reason = "cancelled"
                break
            info = TokenInfo(ord(ch), -0.5, -0.25, [(ord(ch), -0.5)][:p.top_logprobs])
            out.append(info)
            if p.stream:
                sink.on_events([TokenEvent(handle, (echo if i == 0 else []) + [info], first=i == 0,
                                           snapshot=self.identity)])
            time.sleep(0.001)
        timings = {"prefill-queue-duration": 0.001, "num-concurrent-requests": 1, "prompt-tokens": len(req.prompt_ids)}
        sink.on_events([FinalEvent(handle, reason, out, echo, timings, snaps)])


@pytest.fixture
def fake():
    r = FakeReplica()
    assert isinstance(r, Replica)          # the runtime-checkable protocol: every member is there
    return r


def client_for(replica, **kw) -> TestClient:
    return TestClient(create_app(replica, api_key="k", **kw))


def complete(client, **body):
    return client.post("/inference/v1/completions", json={"model": MODEL, **body}, headers=KEY)


def sse_events(text: str) -> list:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]


def test_completion_text_usage_and_snapshot_identity(fake):
    c = client_for(fake)
    r = complete(c, prompt="hi", max_tokens=5, raw_output=True, perf_metrics_in_response=True, logprobs=True)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == "hello" and choice["finish_reason"] == "length"
    assert choice["raw_output"]["completion_token_ids"] == [ord(ch) for ch in "hello"]
    assert [e["logprob"] for e in choice["logprobs"]["content"]] == [-0.5] * 5
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert body["perf_metrics"]["snapshot-identity"] == "base"
    assert r.headers["fireworks-snapshot-identity"] == "base"
    assert fake.submitted[0].prompt_ids == [ord("h"), ord("i")]

    r = c.post("/hot_load/v1/models/hot_load", json={"identity": "snap-1"}, headers=KEY)
    assert r.status_code == 200 and r.json()["replicas"][0]["current_snapshot_identity"] == "snap-1"
    r = complete(c, prompt=[1, 2], max_tokens=3, perf_metrics_in_response=True)
    assert r.json()["perf_metrics"]["snapshot-identity"] == "snap-1"
    assert r.headers["fireworks-snapshot-identity"] == "snap-1"


def test_stop_string_cancels_the_replica_and_cuts_text(fake):
    c = client_for(fake)
    for stream in (False, True):
        fake.cancelled.clear()
        r = complete(c, prompt="x", max_tokens=16, stop=[". "], stream=stream, raw_output=True)
        assert r.status_code == 200, r.text
        if stream:
            events = sse_events(r.text)
            text = "".join(ch["text"] for e in events for ch in e["choices"])
            final = events[-1]["choices"][0]
            assert r.text.rstrip().endswith("data: [DONE]")
        else:
            final = r.json()["choices"][0]
            text = final["text"]
        assert text == "hello world" and final["finish_reason"] == "stop"
        # tokens up to the one that completed the stop string; the replica was told to stop
        assert final["raw_output"]["completion_token_ids"] == [ord(ch) for ch in "hello world. "][:13]
        assert len(fake.cancelled) == 1


def test_stream_chunks_echo_and_usage(fake):
    c = client_for(fake)
    r = complete(c, prompt="ab", max_tokens=4, stream=True, echo=True, logprobs=True, perf_metrics_in_response=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["text"].startswith("ab")
    assert "".join(ch["text"] for e in events for ch in e["choices"]) == "abhell"
    assert len(events[0]["choices"][0]["logprobs"]["content"]) == 3      # 2 echoed + 1 new
    assert events[-1]["usage"]["completion_tokens"] == 4
    assert events[-1]["perf_metrics"]["snapshot-identity"] == "base"


def test_n_choices_each_get_a_request(fake):
    c = client_for(fake)
    r = complete(c, prompt="q", max_tokens=2, n=3, seed=5)
    assert r.status_code == 200 and [ch["index"] for ch in r.json()["choices"]] == [0, 1, 2]
    assert len({req.params.seed for req in fake.submitted}) == 3          # one seed, three different streams


def test_one_failing_choice_is_a_500_for_its_request_only(fake):
    c = client_for(fake)
    fake.fail_next = "boom"
    r = complete(c, prompt="q", max_tokens=2)
    assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
    assert complete(c, prompt="q", max_tokens=2).status_code == 200


def test_validation_errors_name_the_field(fake):
    c = client_for(fake)
    for body, field in [({"top_k": 10 ** 30}, "top_k"), ({"temperature": -1}, "temperature"),
                        ({"max_tokens": 10, "context_length_exceeded_behavior": "error", "prompt": "x" * 60},
                         "max_tokens"), ({"prompt": "hi \udcff"}, "prompt"), ({"bogus": 1}, "bogus")]:
        raw = json.dumps({"model": MODEL, "prompt": "x", **body})     # ASCII JSON: "\udcff" stays escaped
        r = c.post("/inference/v1/completions", content=raw, headers={**KEY, "content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == field
    # max_tokens lowered to fit the context by default
    r = complete(c, prompt="x" * 60, max_tokens=32768, raw_output=True)
    assert r.status_code == 200 and fake.submitted[-1].params.max_tokens == 4


def test_malformed_bodies_are_4xx_and_keep_the_connection(fake):
    c = client_for(fake, max_body_bytes=1000)
    url, h = "/inference/v1/completions", {**KEY, "content-type": "application/json"}
    cases = [(b"\xff\xfe{", 400), (b"[" * 100_0 + b"]" * 100_0, 413), (b"[" * 900 + b"]" * 0, 400),
             (b'{"model": "' + MODEL.encode() + b'", "prompt": "hi \\udcff"}', 400), (b"x" * 2000, 413),
             (b"{}", 400), (b"", 400)]
    for raw, status in cases:
        r = c.post(url, content=raw, headers=h)
        assert r.status_code == status, (raw[:30], r.status_code, r.text)
        assert "error" in r.json()
    deep = b"[" * 100_000
    r = client_for(fake, max_body_bytes=1 << 20).post(url, content=deep, headers=h)
    assert r.status_code == 400 and "nested" in r.json()["error"]["message"]
    r = c.post(url, content=b"x" * 2000, headers=h)
    assert "1000 bytes" in r.json()["error"]["message"]
    assert complete(c, prompt="ok", max_tokens=1).status_code == 200


def test_not_ready_is_425_and_hotload_errors_are_4xx(fake):
    c = client_for(fake)
    fake._ready = False
    r = complete(c, prompt="x")
    assert r.status_code == 425 and r.headers["retry-after"] == "1"
    fake._ready = True
    r = c.post("/hot_load/v1/models/hot_load", json={"identity": "broken"}, headers=KEY)
    assert r.status_code == 422 and "corrupt" in r.json()["error"]["message"]
    r = c.post("/hot_load/v1/models/hot_load", json={"identity": "a", "reset_prompt_cache": True},
               headers={**KEY, "x-workbench-hotload-drain": "true", "x-fireworks-hot-load-source-url": "/x"})
    assert r.status_code == 200
    assert fake.hotloads[-1].drain is True and fake.hotloads[-1].source_url == "/x"
    assert fake.hotloads[-1].reset_prompt_cache is True
    r = c.post("/hot_load/v1/models/hot_load", json={"identity": "a", "extra": 1}, headers=KEY)
    assert r.status_code == 400 and "Extra inputs are not permitted" in r.json()["error"]["message"]
    assert c.post("/hot_load/v1/models/hot_load", json={"identity": "a"}, headers={"X-Api-Key": "no"}).status_code == 401


def test_healthz_answers_while_a_request_is_in_flight(fake):
    c = client_for(fake)
    fake.gate.clear()                        # generation blocks until released
    out = {}
    t = threading.Thread(target=lambda: out.update(r=complete(c, prompt="x", max_tokens=2)))
    t.start()
    deadline = time.time() + 30
    while not fake.submitted and time.time() < deadline:
        time.sleep(0.01)
    assert fake.submitted
    assert c.get("/healthz", headers=KEY).json()["ready"] is True
    fake.gate.set()
    t.join(30)
    assert out["r"].status_code == 200


def test_plain_starlette_routes_answer_json_and_http_errors_carry_json(fake):
    """The app is Starlette with route decorators (workbench.backend.asgi), not FastAPI: dict answers are
    JSON, and an unknown path, a wrong method or a missing key answer a JSON error naming the problem."""
    c = client_for(fake)
    assert c.get("/healthz", headers=KEY).json()["status"] == "ok"
    assert c.get("/readyz", headers=KEY).json() == {"ready": True}
    assert "replicas" in c.get("/hot_load/v1/models/hot_load", headers=KEY).json()
    r = c.get("/no/such/route", headers=KEY)
    assert r.status_code == 404 and "no replica endpoint GET /no/such/route" in r.json()["error"]["message"]
    r = c.get("/v1/completions", headers=KEY)
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = c.get("/healthz")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
