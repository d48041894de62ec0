"""`lmfab serve`: a real uvicorn server on a free localhost port, talked to over HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="the serving tests' HTTP client (dev extra)")
uvicorn = pytest.importorskip("uvicorn", reason="lmfab serve runs on uvicorn (dev extra)")

from lmfab.infer.generate import generate, load_trained  # noqa: E402
from lmfab.serve.app import ChatMessage, chat_prompt, create_app  # noqa: E402

pytestmark = pytest.mark.slow  # a live server, a trained model: tens of seconds in all

PROMPTS = ["The king", "And then the", "A", "Once upon a time there was"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    torch.set_num_threads(1)
    model, tok, _ = load_trained(tiny_run)
    app = create_app(model, tok, model_name="tiny", max_batch_size=8)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app, model, tok
    srv.should_exit = True
    thread.join(timeout=30)


def _post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=120, **kw)


def test_health_and_models(server):
    url, *_ = server
    assert httpx.get(url + "/health").json()["status"] == "ok"
    models = httpx.get(url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_concurrent_requests_get_the_greedy_text_of_lmfab_generate(server):
    url, app, model, tok = server
    expected = generate(model, tok, PROMPTS, max_new_tokens=12)
    batcher = app.state.batcher
    batches_before = batcher.batches
    batcher.hold()  # let all eight queue up, then decode them together

    def ask(p):
        r = _post(url, "/v1/completions", {"model": "tiny", "prompt": p, "max_tokens": 12,
                                           "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        futures = [pool.submit(ask, p) for p in PROMPTS * 2]
        deadline = time.monotonic() + 120  # a guard against hanging, not a speed check
        while batcher.pending() < len(futures):
            assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
            assert time.monotonic() < deadline, f"{batcher.pending()} requests arrived"
            time.sleep(0.01)
        batcher.release()
        answers = [f.result() for f in futures]
    assert [a["choices"][0]["text"] for a in answers] == expected * 2
    assert all(a["object"] == "text_completion" and a["usage"]["completion_tokens"] > 0
               for a in answers)
    assert batcher.batches - batches_before == 1 and batcher.largest_batch == 8


def test_streamed_completion_and_chat_match_the_plain_ones(server):
    url, _, model, tok = server
    body = {"prompt": "The king", "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == generate(model, tok, ["The king"], max_new_tokens=10)[0]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    plain = _post(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 10,
                                                "temperature": 0}).json()
    want = generate(model, tok, [chat_prompt([ChatMessage(**m) for m in msgs])],
                    max_new_tokens=10, stop=["\nUser:"])[0]
    assert plain["object"] == "chat.completion"
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": want}
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                      json={"messages": msgs, "max_tokens": 10, "temperature": 0,
                            "stream": True}) as r:
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines()
                  if ln.startswith("data: ") and ln != "data: [DONE]"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want


def test_a_client_leaving_mid_stream_does_not_stop_the_server(server):
    url, _, model, tok = server
    body = {"prompt": "The", "max_tokens": 200, "temperature": 0.8, "stream": True,
            "stop": []}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    r = _post(url, "/v1/completions", {"prompt": "The king", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == generate(model, tok, ["The king"],
                                                      max_new_tokens=6)[0]


def test_bad_requests_get_a_4xx_with_a_message(server):
    url, *_ = server
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid request" in r.json()["error"]["message"]
    r = _post(url, "/v1/completions", {"prompt": "x", "temperature": "hot"})
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = _post(url, "/v1/chat/completions", {"messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = _post(url, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "'tiny'" in err["message"]
    r = _post(url, "/v1/completions", {"prompt": "the king and the queen " * 40})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "context is 32" in err["message"]
    assert httpx.get(url + "/health").status_code == 200  # still up


def test_the_openai_client_talks_to_it(server):
    openai = pytest.importorskip("openai", reason="the OpenAI client (dev extra)")
    url, _, model, tok = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    c = client.completions.create(model="tiny", prompt="The king", max_tokens=8, temperature=0)
    assert c.choices[0].text == generate(model, tok, ["The king"], max_new_tokens=8)[0]
    msgs = [{"role": "user", "content": "Hello"}]
    pieces = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == generate(model, tok, ["User: Hello\n\nAssistant:"],
                                       max_new_tokens=8, stop=["\nUser:"])[0]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x")


class _SlowTokenizer:
    """The run's tokenizer with a 20 ms decode: a long streamed request then spans half a
    second or more of decode steps, long enough for a second request to arrive meanwhile."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        time.sleep(0.02)
        return self.tok.decode(ids)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("continuous", [True, False])
def test_a_short_request_joins_a_running_batch_and_finishes_first(tiny_run, continuous):
    """Continuous batching: a request arriving while a long one decodes joins its batch in
    a free row, gets its own greedy text, and is answered before the long one ends. With
    ``continuous=False`` it waits for the next batch instead (the benchmark's peer)."""
    import asyncio

    from lmfab.infer.generate import Request, run_batch
    from lmfab.serve.batcher import Batcher

    model, tok, _ = load_trained(tiny_run)
    short_ids = tok.encode("And then the").ids
    long = Request(tok.encode("The king").ids, max_new_tokens=1000, stop_token_ids=[])
    short = Request(short_ids, max_new_tokens=6, stop_token_ids=[])
    expected = run_batch(model, tok, [Request(short_ids, max_new_tokens=6,
                                              stop_token_ids=[])])[0]
    order = []

    async def finish(job, name):
        while True:
            item = await job.pieces.get()
            if not isinstance(item, str):
                order.append(name)
                return item

    async def main():
        batcher = Batcher(model, _SlowTokenizer(tok), max_batch_size=4, compile=False,
                          continuous=continuous)
        try:
            job_long = batcher.submit(long)
            first = await job_long.pieces.get()  # the long request is decoding
            assert isinstance(first, str)
            job_short = batcher.submit(short)
            got = await asyncio.gather(finish(job_short, "short"), finish(job_long, "long"))
            return batcher, got
        finally:
            batcher.close()

    batcher, (c_short, c_long) = asyncio.run(main())
    if continuous:
        assert order == ["short", "long"]
        assert batcher.batches == 1 and batcher.joined == 1 and batcher.largest_batch == 2
    else:
        assert order == ["long", "short"]
        assert batcher.batches == 2 and batcher.joined == 0 and batcher.largest_batch == 1
    assert c_short.token_ids == expected.token_ids and c_short.text == expected.text
    context = model.cfg.max_seq_len  # the long request runs to the end of the context
    assert c_long.finish_reason == "length"
    assert len(c_long.token_ids) == context - len(long.prompt_ids) > 2 * len(c_short.token_ids)
