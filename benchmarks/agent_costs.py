"""What an agent step costs with the session cache, and what the server's batching buys (issue 20's figures).

    python benchmarks/agent_costs.py [--turns 40] [--repeats 3] [--skip-large] [--out results/agent_costs.json]

On the default tiny model (conf/model/tiny_qwen2.yaml's architecture, random weights: the costs do not depend on
what the weights say), ratios measured side by side in one process, medians over repeats:
- per-turn cost: one agent step (a new observation in, a 4-token action out) at turn 2 and at turn `--turns`, with
  the session cache, and re-encoding and prefilling the whole conversation every turn;
- prefix reuse: the tokens each step feeds with the cache against the new turn's own tokens;
- KV bytes per token of a session;
- the per-turn cost with the cache again at Qwen2.5-0.5B's shape, where a step's fixed compute weighs more against
  attention over the cached keys;
- server throughput: 8 concurrent clients against one client at a time, tokens/s through the HTTP server (run as
  users run it, in its own process).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hsa_train import enable_hsa
from hsa_train.agent import Agent, DecodeOptions, load_trained
from hsa_train.agent.kv import KVState
from hsa_train.model.export import save_pretrained
from hsa_train.model.loading import load_tokenizer

OBS = "Obs: you are in a hallway; ahead 3 open, left wall, right wall; nothing in view."


SHAPES = {  # random weights in two shapes: the default tiny model's, and Qwen2.5-0.5B's (its vocabulary aside)
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
}  # fmt: skip


def model_folder(path: Path, shape: str = "tiny") -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True, **SHAPES[shape]
    )
    model = enable_hsa(AutoModelForCausalLM.from_config(config))
    save_pretrained(model, tokenizer, path)
    return path


def episode(agent: Agent, turns: int, cached: bool) -> tuple[list[float], list[int], list[int], KVState]:
    """Seconds per step, tokens fed per step, the new turn's tokens per step (all after the previous prompt: the
    reply and the new observation), and the last state."""
    session = agent.session([{"role": "system", "content": "Mission: find the green key and bring it back."}])
    options = DecodeOptions(max_new_tokens=4)
    seconds, fed, own = [], [], []
    previous = 0
    for turn in range(turns):
        session.add({"role": "user", "content": f"{OBS} (step {turn})"})
        if not cached:
            session.state = KVState()
        start = time.perf_counter()
        reply = agent.respond([session], options)[0]
        seconds.append(time.perf_counter() - start)
        fed.append(reply.prompt_tokens - reply.cached_tokens)
        own.append(reply.prompt_tokens - previous)
        previous = reply.prompt_tokens
    return seconds, fed, own, session.state


def per_turn(agent: Agent, turns: int, repeats: int, modes: tuple[str, ...] = ("cached", "recompute")) -> dict:
    runs = {mode: [] for mode in modes}
    for _ in range(repeats):  # alternated, so that drift hits both alike
        for mode in runs:
            runs[mode].append(episode(agent, turns, mode == "cached"))
    out = {}
    for mode, results in runs.items():
        early = statistics.median(r[0][1] for r in results)  # turn 2
        late = statistics.median(r[0][-1] for r in results)
        out[mode] = {"turn_2_ms": 1e3 * early, f"turn_{turns}_ms": 1e3 * late, "late_over_early": late / early}
    seconds_cached, fed, own, state = runs["cached"][0]
    out["prefix_reuse"] = {
        "fed_tokens_per_step": fed[1:],
        "new_turn_tokens_per_step": own[1:],
        "steps_feeding_only_new_tokens": sum(f <= o for f, o in zip(fed[1:], own[1:])),
        "steps": turns - 1,
    }
    out["kv_bytes_per_token"] = state.nbytes / max(len(state), 1)
    if "recompute" in out:
        late = f"turn_{turns}_ms"
        out["recompute_over_cached_at_last_turn"] = out["recompute"][late] / out["cached"][late]
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def throughput(folder: Path, clients: int = 8, requests: int = 4, max_tokens: int = 32) -> dict:
    """The server as users run it (`python -m hsa_train.serve`, its own process), driven by `clients` threads
    here, each with one openai client it reuses (a client per request would time connection setup, and clients in
    the server's process would share its interpreter lock)."""
    import openai

    port = _free_port()
    command = [sys.executable, "-m", "hsa_train.serve", str(folder), "--port", str(port), "--name", "tiny"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}") from None
                time.sleep(0.2)
        pool_clients = [openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) for _ in range(clients)]

        def ask(client, i: int) -> int:
            messages = [{"role": "user", "content": f"{OBS} (client {i})"}]
            out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
            return out.usage.completion_tokens

        def worker(c: int) -> int:
            return sum(ask(pool_clients[c], c * requests + r) for r in range(requests))

        for c in range(clients):  # warm up: every client's connection, and the model
            ask(pool_clients[c], c)
        results = {}
        for mode in ("one_at_a_time", "concurrent", "one_at_a_time", "concurrent"):
            start = time.perf_counter()
            if mode == "concurrent":
                with ThreadPoolExecutor(clients) as pool:
                    tokens = sum(pool.map(worker, range(clients)))
            else:
                tokens = sum(ask(pool_clients[0], i) for i in range(clients * requests))
            results.setdefault(mode, []).append(tokens / (time.perf_counter() - start))
        with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
            stats = json.load(response)
    finally:
        server.terminate()
        server.wait(timeout=60)
    seq, con = statistics.median(results["one_at_a_time"]), statistics.median(results["concurrent"])
    return {
        "clients": clients,
        "requests": clients * requests,
        "max_tokens": max_tokens,
        "one_at_a_time_tokens_per_s": seq,
        "concurrent_tokens_per_s": con,
        "concurrent_over_one_at_a_time": con / seq,
        "largest_batch": stats["largest_batch"],
        "server": "python -m hsa_train.serve, its own process; clients reused, one per thread",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-large", action="store_true", help="leave out the Qwen2.5-0.5B-shaped per-turn cost")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "agent_costs.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(Path(tmp) / "model")
        agent = Agent(load_trained(folder))
        result = {"per_turn": per_turn(agent, args.turns, args.repeats), "server": throughput(folder)}
        if not args.skip_large:  # with the cache only: a recompute at this size takes seconds a turn
            large = Agent(load_trained(model_folder(Path(tmp) / "large", "qwen2.5-0.5b")))
            result["per_turn_qwen2.5_0.5b_shape"] = per_turn(large, args.turns, args.repeats, modes=("cached",))
    result["setup"] = {
        "model": "qwen2 256 hidden x 4 layers (random); per_turn_qwen2.5_0.5b_shape: 896 hidden x 24 layers",
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
