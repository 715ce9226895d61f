"""What an agent step costs with the session cache, and what the server's batching buys (issue 20's figures).

    python benchmarks/agent_costs.py [--turns 40] [--repeats 3] [--out benchmarks/results/agent_costs.json]

All on the default tiny model (conf/model/tiny_qwen2.yaml's architecture, random weights: the costs do not depend
on what the weights say), ratios measured side by side in one process, medians over repeats:
- per-turn cost: one agent step (a new observation in, a 4-token action out) at turn 2 and at turn `--turns`, with
  the session cache, and re-encoding and prefilling the whole conversation every turn;
- prefix reuse: the tokens each step feeds with the cache against the new turn's own tokens;
- KV bytes per token of a session;
- server throughput: 8 concurrent clients against one client at a time, tokens/s through the HTTP server.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from hsa_train import enable_hsa
from hsa_train.agent import Agent, DecodeOptions, load_trained
from hsa_train.agent.kv import KVState
from hsa_train.model.export import save_pretrained
from hsa_train.model.loading import load_tokenizer

OBS = "Obs: you are in a hallway; ahead 3 open, left wall, right wall; nothing in view."


def tiny_folder(path: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    model = enable_hsa(AutoModelForCausalLM.from_config(config))
    save_pretrained(model, tokenizer, path)
    return path


def episode(agent: Agent, turns: int, cached: bool) -> tuple[list[float], list[int], list[int], KVState]:
    """Seconds per step, tokens fed per step, the new turn's own tokens per step, and the last state."""
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
        previous = reply.prompt_tokens + reply.completion_tokens
    return seconds, fed, own, session.state


def per_turn(agent: Agent, turns: int, repeats: int) -> dict:
    runs = {"cached": [], "recompute": []}
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
    out["recompute_over_cached_at_last_turn"] = out["recompute"][f"turn_{turns}_ms"] / out["cached"][f"turn_{turns}_ms"]
    return out


def throughput(folder: Path, clients: int = 8, requests: int = 4, max_tokens: int = 32) -> dict:
    import openai
    import uvicorn

    from hsa_train.agent.engine import Engine
    from hsa_train.serve import create_app

    engine = Engine(Agent(load_trained(folder)), max_batch=16)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"

    def ask(i: int) -> int:
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        messages = [{"role": "user", "content": f"{OBS} (client {i})"}]
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0)
        return out.usage.completion_tokens

    ask(0)  # warm up
    results = {}
    for mode in ("one_at_a_time", "concurrent", "one_at_a_time", "concurrent"):
        start = time.perf_counter()
        if mode == "concurrent":
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(ask, range(clients * requests)))
        else:
            tokens = sum(ask(i) for i in range(clients * requests))
        results.setdefault(mode, []).append(tokens / (time.perf_counter() - start))
    server.should_exit = True
    thread.join()
    stats = engine.stats()
    engine.close()
    seq, con = statistics.median(results["one_at_a_time"]), statistics.median(results["concurrent"])
    return {
        "clients": clients,
        "requests": clients * requests,
        "max_tokens": max_tokens,
        "one_at_a_time_tokens_per_s": seq,
        "concurrent_tokens_per_s": con,
        "concurrent_over_one_at_a_time": con / seq,
        "largest_batch": stats["largest_batch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "agent_costs.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_folder(Path(tmp) / "model")
        agent = Agent(load_trained(folder))
        result = {"per_turn": per_turn(agent, args.turns, args.repeats), "server": throughput(folder)}
    result["setup"] = {
        "model": "qwen2 256 hidden x 4 layers (random)",
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
