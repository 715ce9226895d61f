"""An OpenAI-compatible server for an HSA model: what agent harnesses and benchmarks call.

    python -m hsa_train.serve outputs/<run>/model [--host 127.0.0.1] [--port 8000] [--api-key KEY]

vLLM and SGLang cannot serve a per-token attention bias (their kernels take no per-key slopes), so an HSA model is
served here, through the agent runtime: `/v1/chat/completions` (whole or streamed as server-sent events; messages
may carry `semantic_type`, untyped ones are typed by the rules saved with the model; tools and tool calls as the
template renders them; max_tokens, temperature, top_p, seed, stop, n; usage with the cached prompt tokens),
`/v1/models`, `/health` (with the prefix cache's hit rate), and `/tokenize` (ids and the semantic type of every
token). Concurrent requests are answered in one batch; a request that extends an earlier conversation reuses its
cached prefix. A bad request gets a 400 in OpenAI's error shape naming the field. SIGTERM finishes the requests in
flight, then exits.
"""

import argparse
import asyncio
import json
import re
import signal
import sys
import time
from typing import Any

from hsa_train.agent.api import RequestError, chunk, completion, completion_id, parse_chat_request, reply_message
from hsa_train.agent.api import finish_reason as finish_of
from hsa_train.agent.api import usage as usage_of
from hsa_train.agent.engine import Engine, Job
from hsa_train.agent.folder import load_trained
from hsa_train.agent.session import Agent, ContextTooLong
from hsa_train.model.loading import TORCH_DTYPES
from hsa_train.types import one_line


def error_response(exc: Exception):
    from fastapi.responses import JSONResponse

    if not isinstance(exc, RequestError):
        if isinstance(exc, ContextTooLong):
            exc = RequestError(one_line(exc), "messages", "context_length_exceeded")
        elif isinstance(exc, ValueError):  # the conversation itself: a message the data checks refuse
            where = re.search(r"\bmessage (\d+)", str(exc))
            exc = RequestError(one_line(exc), f"messages[{where.group(1)}]" if where else "messages", "invalid_value")
        else:
            exc = RequestError(one_line(exc), None, "server_error", 500)
    return JSONResponse(exc.body(), status_code=exc.status)


def create_app(engine: Engine, model_id: str, api_key: str | None = None, cut: bool = False):
    """The ASGI app over a running engine (`cut`: cut an over-long conversation as training does, instead of
    answering 400)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    agent = engine.agent
    limit = agent.max_tokens or 1 << 30
    app = FastAPI(title="hsa_train", docs_url=None, redoc_url=None)
    started = int(time.time())

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization") != f"Bearer {api_key}":
                body = RequestError("invalid API key: send Authorization: Bearer <key>", None, "invalid_api_key")
                return JSONResponse(body.body(), status_code=401)
        return await call_next(request)

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except ValueError:
            raise RequestError("the request body is not valid JSON", None, "invalid_json") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        card = {"id": model_id, "object": "model", "created": started, "owned_by": "hsa_train"}
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        try:
            body = await body_of(request)
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
                raise RequestError("give {messages: [...]} (tools, typing optional)", "messages", "invalid_value")
            fn = lambda: _tokenize(agent, body)  # noqa: E731
            return await asyncio.wrap_future(engine.call(fn))
        except Exception as exc:
            return error_response(exc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            req = parse_chat_request(await body_of(request), model_id, limit)
        except Exception as exc:
            return error_response(exc)
        cid = completion_id()
        if not req.stream:
            job = Job(req.messages, req.options, req.tools, req.typing, cut)
            try:
                answer = await asyncio.wrap_future(engine.submit(job))
            except Exception as exc:
                return error_response(exc)
            return completion(cid, model_id, answer.replies, answer.messages)
        return await _stream(engine, req, cid, model_id, cut, StreamingResponse)

    return app


def _tokenize(agent: Agent, body: dict) -> dict:
    unknown = sorted(set(body) - {"messages", "tools", "typing", "model"})
    if unknown:
        raise RequestError(f"unrecognized argument: {unknown[0]}", unknown[0], "unknown_parameter")
    session = agent.session(body["messages"], body.get("tools"), typing=body.get("typing"))
    prompt = agent.prompt(session, cut=False)
    names = agent.st.types.names
    return {
        "count": len(prompt.ids),
        "max_tokens": agent.max_tokens,
        "tokens": prompt.ids,
        "semantic_ids": prompt.sem,
        "semantic_types": [names[i] for i in prompt.sem],
        "messages": [
            {"role": m["role"], "semantic_type": m["semantic_type"], "type_rule": m["type_rule"]}
            for m in session.messages
        ],
    }


async def _stream(engine: Engine, req, cid: str, model_id: str, cut: bool, StreamingResponse):
    """Server-sent events: a role chunk per choice, text as it is decoded, each choice's finish, usage if asked,
    [DONE]. With tools the text waits for the end (its tool calls are known only then). A request refused
    before decoding starts gets its 400, not a stream."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(req.messages, req.options, req.tools, req.typing, cut)
    job.on_text = lambda k, text, finish: loop.call_soon_threadsafe(events.put_nowait, (k, text, finish))
    done = asyncio.wrap_future(engine.submit(job))
    first = asyncio.ensure_future(events.get())
    await asyncio.wait({first, done}, return_when=asyncio.FIRST_COMPLETED)
    if done.done() and done.exception() is not None:
        first.cancel()
        return error_response(done.exception())
    n, buffered = len(req.options), bool(req.tools)

    def sse(payload: Any) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def events_out():
        for k in range(n):
            yield sse(chunk(cid, model_id, k, {"role": "assistant", "content": ""}))
        finished, item = 0, await first
        while True:
            k, text, finish = item
            if text and not buffered:
                yield sse(chunk(cid, model_id, k, {"content": text}))
            if finish is not None:
                finished += 1
            if finished == n:
                break
            item = await events.get()
        try:
            answer = await done
        except Exception as exc:  # the batch failed mid-stream: say so in the stream
            yield sse(RequestError(one_line(exc), None, "server_error", 500).body())
            yield "data: [DONE]\n\n"
            return
        for k, reply in enumerate(answer.replies):
            if buffered:
                message = reply_message(reply)
                delta = {"content": message["content"]}
                if message.get("tool_calls"):
                    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
                yield sse(chunk(cid, model_id, k, delta))
            yield sse(chunk(cid, model_id, k, {}, finish_of(reply)))
        if req.include_usage:
            yield sse({**chunk(cid, model_id, 0, {}), "choices": [], "usage": usage_of(answer.replies)})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events_out(), media_type="text/event-stream")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hsa_train.serve", description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("model", help="a folder hsa_train wrote (<run>/model or <run>/adapter)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (else 401)")
    parser.add_argument("--name", default=None, help="the model id clients name (default: the run's folder name)")
    parser.add_argument("--max-batch", type=int, default=16, help="replies decoded together at most (16)")
    parser.add_argument("--cache-mb", type=float, default=512, help="prefix cache budget in MiB (512)")
    parser.add_argument("--max-tokens", type=int, default=None, help="token limit (default: the run's cutoff_len)")
    parser.add_argument("--truncate", action="store_true", help="cut over-long conversations as training does")
    parser.add_argument("--backend", default=None, help="attention backend: eager | sdpa | flex (as trained)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES), help="weights dtype (float32)")
    parser.add_argument("--drain-s", type=float, default=30, help="seconds SIGTERM waits for requests (30)")
    args = parser.parse_args(argv)
    try:
        import uvicorn

        if args.max_batch < 1 or args.cache_mb < 0 or args.port < 0:
            raise ValueError("--max-batch must be >= 1, --cache-mb and --port >= 0")
        trained = load_trained(args.model, args.device, args.dtype, args.backend, merge=True)
        agent = Agent(trained, max_tokens=args.max_tokens)
    except ImportError:
        print("hsa_train.serve: error: the server needs fastapi and uvicorn: pip install 'hsa_train[serve]'")
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"hsa_train.serve: error: {one_line(exc)}", file=sys.stderr)
        return 2
    engine = Engine(agent, max_batch=args.max_batch, cache_bytes=int(args.cache_mb * 2**20))
    model_id = args.name or trained.name
    app = create_app(engine, model_id, args.api_key, cut=args.truncate)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.drain_s
    )
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM / SIGINT, then raises the signal again under the handlers it found: these, so
    # that the engine's queue is finished and the process exits 0 rather than dying of the re-raised signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"serving {model_id} on http://{args.host}:{args.port}/v1 (SIGTERM drains and stops)", flush=True)
    server.run()
    engine.close()
    print(f"stopped: {json.dumps(engine.stats())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
