"""The agent runtime (hsa_train/agent): a session's next-token logits equal a full recompute of the whole
conversation at every turn (eager, sdpa, flex), only new tokens are fed, untyped messages are typed by the rules
saved with the model, long sessions are cut as training cuts, decoding is seeded per reply and stops where told."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import ROOT, tiny_model

from hsa_train import enable_hsa
from hsa_train.agent import Agent, DecodeOptions, load_trained
from hsa_train.agent.decoding import Decoding
from hsa_train.data.rules import RULES_FILE, SavedRules
from hsa_train.data.spec import DatasetSpec
from hsa_train.data.tokenizer import SemanticTokenizer
from hsa_train.data.toolcalls import hermes_tool_calls, parse_tool_calls
from hsa_train.data.truncate import fit
from hsa_train.data.typing import TypeRules
from hsa_train.model.export import save_pretrained
from hsa_train.model.loading import load_tokenizer

LAMBDAS = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.05, "PROCESS_NOISE": 0.3}
RULES = {
    "default_semantic_type": None,
    "semantic_type_by_role": {"system": "GLOBAL_CONDITION"},
    "semantic_type_rules": [{"pattern": "^Event:", "type": "KEY_EVENT", "role": None}],
}


def write_folder(path, backend="sdpa", cutoff_len=None, generated_type=None, noise_window=None):
    tokenizer = load_tokenizer(None)
    model = enable_hsa(
        tiny_model(vocab_size=len(tokenizer)), lambdas=LAMBDAS, backend=backend, generated_type=generated_type
    )
    save_pretrained(model, tokenizer, path)
    SavedRules({"trajectories": RULES}, "trajectories", cutoff_len, noise_window=noise_window).save(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("agent") / "model")


def full_logits(agent: Agent, session) -> torch.Tensor:
    """The reference: the whole conversation encoded from scratch and run in one forward, no cache."""
    prompt = agent.st.encode_prompt(session.messages, session.tools, generated_type=agent.generated_type)
    with torch.no_grad():
        out = agent.model(
            input_ids=torch.tensor([prompt["input_ids"]]), semantic_ids=torch.tensor([prompt["semantic_ids"]])
        )
    return out.logits[0, -1].float()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_session_logits_equal_a_full_recompute_at_every_turn(folder, backend):
    agent = Agent(load_trained(folder, backend=backend))
    short = agent.session([{"role": "system", "content": "Find the key."}])
    long = agent.session([{"role": "system", "content": "Reach the door."}, {"role": "user", "content": "Obs: " * 12}])
    options = [DecodeOptions(max_new_tokens=6), DecodeOptions(max_new_tokens=3, temperature=0.9, seed=3)]
    before = [0, 0]
    for turn in range(4):
        short.add({"role": "user", "content": f"Obs: step {turn}" if turn != 1 else "Event: a key"})
        long.add({"role": "user", "content": f"Obs: corridor {turn}"})
        sessions = [short, long]
        prompts = [agent.prompt(s) for s in sessions]
        shared = [s.state.shared_prefix(p.ids, p.sem) for s, p in zip(sessions, prompts)]
        batch = agent.start(sessions, prompts)
        for row, session in enumerate(sessions):
            torch.testing.assert_close(batch.logits[row], full_logits(agent, session), atol=2e-6, rtol=1e-5)
            # the last turn's whole prompt comes from the cache (and its reply, where the rendered reply is the
            # tokens generated: a random model's need not re-tokenize alike); the rest is fed
            assert shared[row] >= before[row]
            assert batch.reused[row] + batch.fed[row] == len(prompts[row].ids)
        before = [len(p.ids) for p in prompts]
        replies = agent.respond(sessions, options)
        assert [r.cached_tokens > 0 for r in replies] == [turn > 0] * 2
        assert [r.prompt_tokens for r in replies] == [len(p.ids) for p in prompts]


def test_untyped_messages_are_typed_by_the_saved_rules(folder):
    """A message without a type gets the type training's rules gave it; an explicit semantic_type wins; the prompt's
    semantic_ids are training's encoding of the same rule-typed messages."""
    trained = load_trained(folder)
    assert (folder / RULES_FILE).is_file()
    agent = Agent(trained)
    messages = [
        {"role": "system", "content": "Find the key."},
        {"role": "user", "content": "Event: a key, left."},
        {"role": "user", "content": "Obs: a wall."},
        {"role": "user", "content": "Event: marked noise", "semantic_type": "PROCESS_NOISE"},
    ]
    session = agent.session(messages)
    assert [(m["semantic_type"], m["type_rule"]) for m in session.messages] == [
        ("GLOBAL_CONDITION", "role:system"),
        ("KEY_EVENT", "rule:0:^Event:"),
        ("PROCESS_NOISE", "default"),
        ("PROCESS_NOISE", "explicit"),
    ]
    reference_rules = TypeRules(DatasetSpec(path="x", **RULES), trained.st.types)  # training's own typing
    typed = reference_rules.apply([dict(m) for m in messages])
    expected = SemanticTokenizer(trained.st.tokenizer).encode_prompt(typed)
    assert agent.prompt(session).sem == expected["semantic_ids"]
    without = SavedRules()  # a folder without saved rules: every untyped message takes the default type
    assert without.type_rules(trained.st.types).type_of({"role": "user", "content": "Event: x"}) == (
        "PROCESS_NOISE",
        "default",
    )
    with pytest.raises(ValueError, match="no such dataset"):
        agent.session(typing="elsewhere")


def test_a_long_session_is_cut_as_training_cuts(tmp_path, caplog):
    """Over the limit (the saved cutoff_len, room kept for the reply), the session keeps the messages training's
    truncation keeps for the same conversation: the task, the key event, the newest turn; the oldest noise goes."""
    agent = Agent(load_trained(write_folder(tmp_path / "model", cutoff_len=120)), cut_margin=0.0)
    session = agent.session([{"role": "system", "content": "Find the key."}])
    for i in range(8):
        session.add({"role": "user", "content": "Event: the key" if i == 2 else f"Obs: hallway {i} " + "x " * 6})
    before = [dict(m) for m in session.messages]
    reserve = 8
    with caplog.at_level(logging.INFO, logger="hsa_train.agent.session"):
        prompt = agent.prompt(session, reserve)
    assert prompt.cut is not None and session.cuts == 1
    assert len(prompt.ids) + reserve <= 120
    assert any("session cut to fit" in r.message for r in caplog.records)
    kept = [m["content"] for m in session.messages]
    assert kept[0] == "Find the key." and "Event: the key" in kept and kept[-1] == before[-1]["content"]
    assert "Obs: hallway 0 " + "x " * 6 not in kept  # the oldest noise went first
    # training's truncation of the same conversation (with a reply of the same reserve) keeps the same messages
    st = agent.st
    probe = {"role": "assistant", "content": "", "semantic_type": agent.generated_type}
    full = len(st.encode_detailed([*before, probe]).features["input_ids"])
    prompt_len = len(st.encode_prompt(before, generated_type=agent.generated_type)["input_ids"])
    _, info = fit(st.encode_detailed, [*before, probe], None, 120 - reserve + full - prompt_len)
    assert kept == [before[i]["content"] for i in info.kept if i < len(before)]
    reply = agent.respond([session], DecodeOptions(max_new_tokens=reserve))[0]
    assert reply.prompt_tokens + reply.completion_tokens <= 120
    roomy = Agent(agent.trained, cut_margin=0.25)  # the default: a cut leaves a quarter of the limit free
    session = roomy.session(before)
    assert len(roomy.prompt(session, reserve).ids) <= 0.75 * 120 - reserve


def test_a_model_trained_with_a_noise_window_sees_only_the_newest_noise(tmp_path):
    """Observation masking, turn by turn: the session holds the task, the key event and the newest 2 noise turns
    (the one the reply answers among them), exactly training's window of the same conversation, and its logits
    equal a full recompute of the masked conversation."""
    agent = Agent(load_trained(write_folder(tmp_path / "model", noise_window=2)))
    session = agent.session([{"role": "system", "content": "Find the key."}])
    seen = []
    for turn in range(6):
        new = {"role": "user", "content": "Event: the key is red" if turn == 1 else f"Obs: hallway {turn}"}
        session.add(new)
        seen.append(new["content"])
        prompt = agent.prompt(session)
        batch = agent.start([session], [prompt])
        torch.testing.assert_close(batch.logits[0], full_logits(agent, session), atol=2e-6, rtol=1e-5)
        reply = agent.respond([session], DecodeOptions(max_new_tokens=3), prompts=[prompt])[0]
        seen.append(reply.message["content"])
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["Event: the key is red", "Obs: hallway 4", "Obs: hallway 5"]
    assert session.masked == 3  # hallways 0, 2 and 3, each with the reply it got
    assert session.messages[0]["content"] == "Find the key." and session.messages[-1]["role"] == "assistant"


def test_a_model_trained_without_the_bias_runs_without_it(tmp_path):
    """A run with hsa.enabled=false exports λ = 0 for every type: its folder runs plain attention (the stock
    model's logits), not the default λ, and still types and cuts by the run's types."""
    from omegaconf import OmegaConf

    from hsa_train.model.settings import HSASettings
    from hsa_train.training.distributed import DistInfo
    from hsa_train.training.export import export_model

    tokenizer = load_tokenizer(None)
    torch.manual_seed(0)
    model = tiny_model(vocab_size=len(tokenizer))
    settings = HSASettings.from_mapping(OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "hsa" / "default.yaml")))
    info = DistInfo(mode="none")
    export_model(
        model, tokenizer, tmp_path / "model", info, lora=False, merge=False, rules=SavedRules(), plain=settings
    )
    trained = load_trained(tmp_path / "model")
    assert set(trained.settings.lambdas.values()) == {0.0} and list(trained.st.types.names) == settings.types
    ids = torch.tensor([tokenizer("Task: find the key. Obs: a hallway, then another hallway.")["input_ids"]])
    sem = torch.full_like(ids, 2)
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        loaded = trained.model(input_ids=ids, semantic_ids=sem).logits
    torch.testing.assert_close(loaded, stock, atol=2e-5, rtol=1e-4)


def test_greedy_replies_match_transformers_generate_and_seeds_ignore_the_batch(folder):
    agent = Agent(load_trained(folder))
    convo = [{"role": "system", "content": "Find the key."}, {"role": "user", "content": "Obs: a hallway."}]
    prompt = agent.prompt(agent.session(convo))
    with torch.no_grad():
        out = agent.model.generate(
            input_ids=torch.tensor([prompt.ids]),
            semantic_ids=torch.tensor([prompt.sem]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=agent.stop_ids,
            pad_token_id=agent.pad_id,
        )
    expected = out[0, len(prompt.ids) :].tolist()
    reply = agent.respond([agent.session(convo)], DecodeOptions(max_new_tokens=12))[0]
    assert reply.tokens == expected[: len(reply.tokens)] and len(reply.tokens) == len(expected)

    sampled = DecodeOptions(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=11)
    alone = agent.respond([agent.session(convo)], sampled)[0].tokens
    other = agent.session([*convo, {"role": "user", "content": "Obs: " + "more " * 20}])
    together = agent.respond(
        [other, agent.session(convo)], [DecodeOptions(max_new_tokens=4, temperature=1.0, seed=5), sampled]
    )
    assert together[1].tokens == alone


def test_decoding_stops_at_stop_strings_and_holds_back_their_start():
    pieces = ["Go", " left", " then", " ST", "OP", " now"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731  (token i is pieces[i])
    decoding = Decoding(decode, DecodeOptions(max_new_tokens=10, stop=["STOP"]), stop_ids=[99])
    sent = []
    for token in range(5):
        decoding.add(token)
        sent.append(decoding.delta())
        if decoding.done:
            break
    assert decoding.finish_reason == "stop" and decoding.text == "Go left then "
    assert sent[3] == " "  # "ST" might begin "STOP": held back
    assert "".join(sent) == "Go left then "
    by_token = Decoding(decode, DecodeOptions(max_new_tokens=10), stop_ids=[2])
    by_token.add(0), by_token.add(1), by_token.add(2)
    assert (by_token.finish_reason, by_token.text) == ("stop", "Go left")
    capped = Decoding(decode, DecodeOptions(max_new_tokens=2), stop_ids=[])
    capped.add(0), capped.add(1)
    assert capped.finish_reason == "length"
    for bad in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stop": [""]}):
        with pytest.raises(ValueError):
            DecodeOptions(**bad)


def test_a_session_with_tools_renders_them_and_checks_them(folder):
    agent = Agent(load_trained(folder))
    tools = [{"type": "function", "function": {"name": "open_door", "parameters": {"type": "object"}}}]
    session = agent.session(tools=tools)
    assert session.messages == [] and session.tools[0]["function"]["name"] == "open_door"
    session.add({"role": "user", "content": "Open it."})
    assert "open_door" in agent.st.tokenizer.decode(agent.prompt(session).ids)
    with pytest.raises(ValueError, match="tool"):
        agent.session([{"role": "user", "content": "hi"}], tools=[42])


def test_tool_calls_in_a_reply_are_parsed_back():
    calls = [{"function": {"name": "open_door", "arguments": {"door": 3}}}, {"name": "look", "arguments": "{}"}]
    text = "Opening it.\n" + hermes_tool_calls(calls) + "\n<tool_call>not json</tool_call>"
    content, parsed = parse_tool_calls(text)
    assert content == "Opening it.\n<tool_call>not json</tool_call>"
    assert parsed == [
        {"type": "function", "function": {"name": "open_door", "arguments": '{"door": 3}'}},
        {"type": "function", "function": {"name": "look", "arguments": "{}"}},
    ]
