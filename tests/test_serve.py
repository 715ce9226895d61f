"""`python -m hsa_train.serve`: the OpenAI-compatible server, driven with the official `openai` client against a
tiny trained model: completions whole and streamed, n and seeds, types visible, prefix reuse, 8 concurrent
clients batched, OpenAI-style 400s that name the field, an API key, and SIGTERM draining the requests in flight."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import cli_env  # noqa: E402

from hsa_train.agent import Agent, load_trained  # noqa: E402
from hsa_train.agent.engine import Engine  # noqa: E402
from hsa_train.data.rules import SavedRules  # noqa: E402
from hsa_train.data.tokenizer import SemanticTokenizer  # noqa: E402
from hsa_train.serve import create_app  # noqa: E402

TASK = [
    {"role": "system", "content": "You are a robot."},
    {"role": "user", "content": "Task: find the red mug.", "semantic_type": "GLOBAL_CONDITION"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_training import tiny_run

    from hsa_train.training.loop import train

    tmp = tmp_path_factory.mktemp("serve")
    metrics = train(*tiny_run(tmp, "train.max_steps=4", "train.save_model=true", "data.cutoff_len=300"), tmp / "run")
    return metrics["model_dir"]


@pytest.fixture(scope="module")
def served(model_dir):
    """The app on a free port in this process: (openai client, base url, engine)."""
    engine = Engine(Agent(load_trained(model_dir, merge=True)), max_batch=16)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), base, engine
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()


def test_a_completion_says_its_usage_and_the_types_of_its_messages(served, model_dir):
    client, base, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [*TASK, {"role": "user", "content": "Event: the mug is on the table."}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    assert 1 <= out.usage.completion_tokens <= 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert choice.message.semantic_type in ("GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE")
    typed = out.model_extra["semantic_types"]
    assert [t["type_rule"] for t in typed] == ["default", "explicit", "default"]  # the demo run has no rules
    tokens = httpx.post(f"{base}/tokenize", json={"messages": messages}).json()
    assert tokens["count"] == out.usage.prompt_tokens == len(tokens["tokens"])
    # the reference: training's tokenizer over the messages typed by the saved (here: empty) rules
    trained = load_trained(model_dir)
    rules = SavedRules.load(model_dir).type_rules(trained.st.types)
    reference = SemanticTokenizer(trained.st.tokenizer).encode_prompt(rules.apply([dict(m) for m in messages]))
    assert tokens["tokens"] == reference["input_ids"] and tokens["semantic_ids"] == reference["semantic_ids"]
    names = trained.st.types.names
    assert tokens["semantic_types"] == [names[i] for i in reference["semantic_ids"]]
    assert "GLOBAL_CONDITION" in tokens["semantic_types"] and tokens["messages"][1]["type_rule"] == "explicit"


def test_a_stream_carries_the_same_reply_as_a_whole_response(served):
    client, _, _ = served
    messages = [*TASK, {"role": "user", "content": "Where is it?"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == (whole.choices[0].message.content or "")
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_are_seeded_and_reproducible(served):
    client, _, _ = served
    ask = dict(model="tiny", messages=[*TASK, {"role": "user", "content": "Go."}], max_tokens=6, n=3, seed=7)
    first = client.chat.completions.create(**ask, temperature=1.0)
    again = client.chat.completions.create(**ask, temperature=1.0)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert 3 <= first.usage.completion_tokens <= 18  # the three choices' tokens
    one = client.chat.completions.create(**{**ask, "n": 1}, temperature=1.0)
    assert one.choices[0].message.content == first.choices[0].message.content  # choice k samples with seed + k


def test_a_conversation_extended_by_a_turn_reuses_its_cached_prefix(served):
    client, base, engine = served
    messages = [*TASK, {"role": "user", "content": "Obs: a hallway, doors left and right."}]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    before = engine.cache.stats()
    nxt = [
        *messages,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Obs: the left door is open."},
    ]
    second = client.chat.completions.create(model="tiny", messages=nxt, max_tokens=5, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens  # the whole first prompt came from the cache
    after = httpx.get(f"{base}/health").json()["prefix_cache"]
    assert after["hits"] == before["hits"] + 1 and after["tokens_reused"] - before["tokens_reused"] == cached
    assert 0 < after["hit_rate"] <= 1 and after["bytes"] <= after["budget_bytes"]


def test_eight_concurrent_clients_are_batched_and_answered_as_alone(served):
    client, _, engine = served
    asks = [[*TASK, {"role": "user", "content": f"Obs: room {i}."}] for i in range(8)]
    alone = [
        client.chat.completions.create(model="tiny", messages=m, max_tokens=6, temperature=0).choices[0].message.content
        for m in asks
    ]
    batches = engine.batches

    def ask(m):
        c = openai.OpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0)
        return (
            c.chat.completions.create(model="tiny", messages=m, max_tokens=6, temperature=0).choices[0].message.content
        )

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, asks))
    assert together == alone
    assert engine.batches - batches < 8 and engine.largest_batch > 1  # some requests shared a batch


@pytest.mark.parametrize(
    "extra, param, code",
    [
        ({"messages": [{"role": "user", "content": "hi", "semantic_type": "URGENT"}]}, "messages[0]", "invalid_value"),
        ({"messages": [{"content": "no role"}]}, "messages[0]", "invalid_value"),
        ({"messages": "hello"}, "messages", "invalid_value"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages", "context_length_exceeded"),
        ({"max_tokens": 100000}, "max_tokens", "invalid_value"),
        ({"temperature": 3}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", "invalid_value"),
        ({"n": 9}, "n", "invalid_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"frequency_penalty": 0.5}, "frequency_penalty", "unsupported"),
        ({"typing": "nowhere"}, "messages", "invalid_value"),
        ({"colour": "blue"}, "colour", "unknown_parameter"),
    ],
)
def test_a_bad_request_gets_a_400_naming_its_field_and_the_server_goes_on(served, extra, param, code):
    client, base, _ = served
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    response = httpx.post(f"{base}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    extra = {k: v for k, v in body.items() if k not in ("model", "messages")}
    with pytest.raises(openai.BadRequestError):  # the client sees it as OpenAI's own 400
        client.chat.completions.create(model="tiny", messages=body["messages"], extra_body=extra)
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.role == "assistant"


def test_broken_json_and_an_unknown_model(served):
    client, base, _ = served
    broken = httpx.post(
        f"{base}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_cli_wants_its_key_and_drains_on_sigterm(model_dir):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hsa_train.serve", model_dir, "--port", str(port), "--api-key", "k3y", "--name", "m",
         "--max-batch", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"serving m on http://127.0.0.1:{port}/v1" in line, proc.stderr.read()[-2000:]
        base = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=base, api_key="k3y", max_retries=0)
        done_at = []

        def ask(seed):
            reply = client.chat.completions.create(model="m", messages=TASK, max_tokens=200, temperature=1.0, seed=seed)
            done_at.append(time.monotonic())
            return reply

        with ThreadPoolExecutor(6) as pool:  # six requests, answered one batch after another (--max-batch 2)
            futures = [pool.submit(ask, seed) for seed in range(6)]
            time.sleep(0.3)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            replies = [f.result(timeout=120) for f in futures]
        assert proc.wait(timeout=60) == 0
        assert all(r.usage.completion_tokens > 0 for r in replies)  # every request in flight answered
        assert max(done_at) > signalled  # some were still decoding when the signal came
        stats = json.loads(proc.stdout.read().split("stopped: ", 1)[1])
        assert stats["requests"] == 6 and stats["failed"] == 0
    finally:
        proc.kill()
