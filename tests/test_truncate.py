"""Truncation (issue 9): the plan against a brute-force reference, `fit` with a scripted encoder (re-render
drift, overlong modes, nothing left to train) and with the real SemanticTokenizer on long trajectories."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from hsa_train.data import SemanticTokenizer
from hsa_train.data.tokenizer import Encoding
from hsa_train.data.truncate import FitInfo, TruncationReport, fit, plan_truncation, split_turns, window_noise

TYPES = ["GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE"]
G, K, N = TYPES
KEEP = [G]


def msg(role, semantic_type, content="", spans=None):
    m = {"role": role, "content": content, "semantic_type": semantic_type}
    if spans:
        m["spans"] = spans
    return m


# -- the plan against a brute-force reference ---------------------------------------------------------------------
def reference_turns(messages):
    """(turns as message indices, names(i): message i's type names, the last assistant message's index): a turn
    starts at a user message, or at an assistant message after a tool result."""
    turns = []
    for i, m in enumerate(messages):
        if m["role"] == "user" or not turns or (m["role"] == "assistant" and messages[i - 1]["role"] == "tool"):
            turns.append([])
        turns[-1].append(i)

    def names(i):
        return [messages[i]["semantic_type"]] + [s[2] for s in messages[i].get("spans", [])]

    return turns, names, max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def reference_plan(messages, tokens, other, cutoff, types, keep):
    """Independent statement of the policy: among all sets of turns that fit and keep what must stay, the one
    that keeps the most important turns, compared turn by turn from the most important down (a turn is more
    important for a more important type, then for being newer). None when nothing fits."""
    turns, names, last_reply = reference_turns(messages)
    must = [t for t, turn in enumerate(turns) if last_reply in turn or any(n in keep for i in turn for n in names(i))]
    free = [t for t in range(len(turns)) if t not in must]
    rank = {t: min(types.index(n) for i in turns[t] for n in names(i)) for t in free}
    ranked = sorted(free, key=lambda t: (rank[t], -t))  # most important first
    size = [sum(tokens[i] for i in turn) for turn in turns]
    for choice in itertools.product([True, False], repeat=len(ranked)):  # lexicographically largest first
        kept = must + [t for t, keep_it in zip(ranked, choice) if keep_it]
        if other + sum(size[t] for t in kept) <= cutoff:
            return sorted(i for t in kept for i in turns[t])
    return None


def random_conversation(rnd: random.Random):
    messages = []
    if rnd.random() < 0.5:
        messages.append(msg("system", rnd.choice(TYPES)))
    for _ in range(rnd.randint(1, 7)):
        messages.append(msg("user", rnd.choice(TYPES)))
        for _ in range(rnd.randint(0, 3)):
            role = rnd.choice(["assistant", "assistant", "tool"])
            spans = [(0, 1, rnd.choice(TYPES))] if rnd.random() < 0.15 else None
            messages.append(msg(role, rnd.choice([K, N, N]), spans=spans))
    if not any(m["role"] == "assistant" for m in messages):
        messages.append(msg("assistant", N))
    return messages


@pytest.mark.parametrize("seed", range(8))
def test_plan_matches_the_brute_force_reference(seed):
    rnd = random.Random(seed)
    for _ in range(150):
        messages = random_conversation(rnd)
        tokens = [rnd.randint(1, 20) for _ in messages]
        other = rnd.randint(0, 3)
        cutoff = rnd.randint(0, other + sum(tokens))
        keep = rnd.choice([[G], [G], [G, K], []])
        expected = reference_plan(messages, tokens, other, cutoff, TYPES, keep)
        if expected is None:
            with pytest.raises(ValueError, match=f"cannot fit in data.cutoff_len={cutoff}"):
                plan_truncation(messages, tokens, other, cutoff, TYPES, keep)
            continue
        kept = plan_truncation(messages, tokens, other, cutoff, TYPES, keep)
        assert kept == expected, (messages, tokens, other, cutoff, keep)
        assert other + sum(tokens[i] for i in kept) <= cutoff
        assert max(i for i, m in enumerate(messages) if m["role"] == "assistant") in kept


def test_turns():
    roles = ["system", "user", "assistant", "tool", "assistant", "user", "assistant", "user", "tool"]
    assert split_turns([{"role": r} for r in roles]) == [[0], [1, 2, 3], [4], [5, 6], [7, 8]]
    agent = ["system", "user", "assistant", "tool", "tool", "assistant", "tool", "assistant"]  # one task, rounds
    assert split_turns([{"role": r} for r in agent]) == [[0], [1, 2, 3, 4], [5, 6], [7]]
    assert split_turns([{"role": r} for r in ["system", "assistant", "user"]]) == [[0, 1], [2]]
    assert split_turns([{"role": "assistant"}]) == [[0]]


def conversation(*turn_types):
    """system(G) + user task(G) / assistant, then one user/assistant turn per type given."""
    messages = [msg("system", G), msg("user", G), msg("assistant", N)]
    for t in turn_types:
        messages += [msg("user", t), msg("assistant", t)]
    return messages


def test_noise_goes_first_oldest_first_then_key_events():
    messages = conversation(N, K, N, K, N, N)  # turns 2..7 (turn 7 holds the last reply)
    tokens = [10] * len(messages)  # 20 per turn, 150 in all

    def kept_turns(kept):
        return [t for t, turn in enumerate(split_turns(messages)) if turn[0] in kept]

    assert kept_turns(plan_truncation(messages, tokens, 0, 130, TYPES, KEEP)) == [0, 1, 3, 4, 5, 6, 7]
    assert kept_turns(plan_truncation(messages, tokens, 0, 110, TYPES, KEEP)) == [0, 1, 3, 5, 6, 7]
    assert kept_turns(plan_truncation(messages, tokens, 0, 90, TYPES, KEEP)) == [0, 1, 3, 5, 7]
    assert kept_turns(plan_truncation(messages, tokens, 0, 70, TYPES, KEEP)) == [0, 1, 5, 7]
    assert kept_turns(plan_truncation(messages, tokens, 0, 50, TYPES, KEEP)) == [0, 1, 7]
    with pytest.raises(ValueError, match=r"cannot fit in data.cutoff_len=49: the turns that must stay .* need 50"):
        plan_truncation(messages, tokens, 0, 49, TYPES, KEEP)


def test_a_small_early_turn_comes_back_when_a_big_one_had_to_go():
    messages = conversation(N, K, N)  # turns: system, task, noise (2 tokens), key event (100), last reply
    tokens = [5, 5, 5, 1, 1, 50, 50, 5, 5]
    # noise goes first (125 left), then the key event (25 left): the noise turn fits again and comes back
    assert plan_truncation(messages, tokens, 0, 40, TYPES, KEEP) == [0, 1, 2, 3, 4, 7, 8]


def test_spans_count_and_unknown_or_missing_things_raise():
    messages = conversation(N, N, N)
    messages[3]["spans"] = [(0, 4, G)]  # a GLOBAL_CONDITION sentence in a noise message: its turn stays
    assert plan_truncation(messages, [10] * 9, 0, 70, TYPES, KEEP) == [0, 1, 2, 3, 4, 7, 8]
    with pytest.raises(ValueError, match="nothing to train"):
        plan_truncation([msg("user", G)], [5], 0, 2, TYPES, KEEP)
    with pytest.raises(ValueError, match="message 1: unknown semantic_type 'BOGUS'"):
        plan_truncation([msg("user", G), msg("assistant", "BOGUS")], [5, 5], 0, 2, TYPES, KEEP)
    untyped = [msg("user", G), msg("assistant", K), msg("user", None), msg("assistant", None)]
    untyped += [msg("user", K), msg("assistant", K), msg("user", N), msg("assistant", N)]
    # None is the default type (PROCESS_NOISE): the untyped turn goes before the KEY_EVENT one
    assert plan_truncation(untyped, [5] * 8, 0, 30, TYPES, KEEP) == [0, 1, 4, 5, 6, 7]
    assert plan_truncation(untyped, [5] * 8, 0, 30, TYPES, KEEP, default_type=G) == [0, 1, 2, 3, 6, 7]


# -- fit, with a scripted encoder ---------------------------------------------------------------------------------
def scripted_encoder(preamble_when_no_system=0, strict=False):
    """Message i holds m["n"] tokens (id = its index), trained when it is an assistant's; 2 tokens of no message
    at the start; `preamble_when_no_system` more tokens in the first message when it is not a system message
    (a template's default system prompt). `strict`: refuse a conversation with nothing to train, as
    SemanticTokenizer does."""

    def encode(messages, tools=None):
        ids, labels, index = [7, 7], [-100, -100], [-1, -1]
        for j, m in enumerate(messages):
            n = m["n"] + (preamble_when_no_system if j == 0 and m["role"] != "system" else 0)
            ids += [j] * n
            labels += [j if m["role"] == "assistant" and m.get("trained", True) else -100] * n
            index += [j] * n
        features = {
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": labels,
            "semantic_ids": [0] * len(ids),
        }
        if strict and set(labels) == {-100}:
            raise ValueError("nothing to train on: the conversation has no assistant message content to learn")
        return Encoding(features, None, index)

    return encode


def sized(messages, sizes):
    return [dict(m, n=n) for m, n in zip(messages, sizes)]


def test_fit_modes():
    messages = sized(conversation(N, K), [4, 4, 4, 4, 4, 4, 4])  # 2 + 28 tokens
    enc, info = fit(scripted_encoder(), messages, None, 30, TYPES, KEEP, "error")
    assert len(enc.features["input_ids"]) == 30 and info == FitInfo("fits", 30, 30)
    with pytest.raises(ValueError, match=r"too long: 30 tokens > data.cutoff_len=29 \(set data.overlong"):
        fit(scripted_encoder(), messages, None, 29, TYPES, KEEP, "error")
    enc, info = fit(scripted_encoder(), messages, None, 29, TYPES, KEEP, "drop")
    assert enc is None and info == FitInfo("dropped", 30, 0)
    enc, info = fit(scripted_encoder(), messages, None, 29, TYPES, KEEP, "truncate")
    assert info.action == "truncated" and info.kept == [0, 1, 2, 5, 6] and info.turns_dropped == {N: 1}
    assert len(enc.features["input_ids"]) == info.tokens_after == 22
    with pytest.raises(ValueError, match="data.overlong='cut'"):
        fit(scripted_encoder(), messages, None, 29, TYPES, KEEP, "cut")


def test_fit_drops_more_when_the_render_grows():
    """Without its system message the template adds 6 tokens: the first plan overshoots, the next one fits."""
    messages = sized([msg("system", N), *conversation(N, N)[1:]], [6, 4, 4, 4, 4, 4, 4])  # 2 + 30 tokens
    enc, info = fit(scripted_encoder(preamble_when_no_system=6), messages, None, 26, TYPES, KEEP, "truncate")
    # the plan drops the system group (6 tokens) -> 26 + 6 = 32; one more noise turn goes -> 24
    assert info.kept == [1, 2, 5, 6] and len(enc.features["input_ids"]) == 24 <= 26
    assert info.turns_dropped == {N: 2}


def test_fit_nothing_to_train_after_truncation():
    messages = sized([msg("user", N), msg("assistant", N), msg("user", G), msg("assistant", N)], [4, 4, 4, 4])
    messages[3]["trained"] = False  # the last reply has no trained token: only the dropped turn had some
    for strict in (False, True):
        with pytest.raises(ValueError, match="nothing to train after truncation to data.cutoff_len=17"):
            fit(scripted_encoder(strict=strict), messages, None, 17, TYPES, KEEP, "truncate")


def test_report_counts_merge_and_summary():
    a, b = TruncationReport(), TruncationReport()
    a.add(FitInfo("fits", 10, 10))
    a.add(FitInfo("truncated", 50, 30, [0, 1], {N: 2, K: 1}))
    b.add(FitInfo("dropped", 70, 0))
    b.add(FitInfo("truncated", 40, 35, [0], {N: 1}))
    b.add_failure()
    b.turns_masked = 4
    total = a + b
    assert total.as_dict() == {
        "seen": 5,
        "truncated": 2,
        "dropped": 1,
        "failed": 1,
        "turns_dropped": {N: 3, K: 1},
        "tokens_seen": 170,
        "tokens_truncated": 25,
        "tokens_dropped": 70,
        "turns_masked": 4,
    }
    assert TruncationReport.from_dict(total.as_dict()) == total
    assert a.seen == 2  # `+` leaves its operands alone
    line = total.summary()
    assert "\n" not in line and "2 truncated" in line and "1 dropped" in line and "1 could not fit" in line
    assert "4 old noise turns masked" in line and "masked" not in a.summary()


# -- fit with the real tokenizer ----------------------------------------------------------------------------------
WORDS = "the robot moves left right forward sees a wall door key apple table room hall opens picks".split()


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "move",
            "description": "Move the robot",
            "parameters": {"type": "object", "properties": {"to": {"type": "string"}}},
        },
    }
]


def trajectory(rnd: random.Random, rounds: int, tools: bool = False) -> list[dict[str, Any]]:
    def text(n):
        return " ".join(rnd.choice(WORDS) for _ in range(n))

    messages = [
        msg("system", rnd.choice([G, N]), "You are a careful agent. " + text(5)),
        msg("user", G, "Task: " + text(rnd.randint(5, 30))),
    ]
    for k in range(rounds):
        kind = rnd.choice([K, N, N, N])
        messages.append(msg("assistant", kind, f"Step {k}: " + text(rnd.randint(3, 40))))
        if tools and rnd.random() < 0.5:  # a tool call and its result, in the same turn
            messages[-1]["tool_calls"] = [{"type": "function", "function": {"name": "move", "arguments": {"to": k}}}]
            messages.append(msg("tool", rnd.choice([K, N]), f"moved to {k}: " + text(rnd.randint(1, 10))))
        observation = f"Observation {k}: " + text(rnd.randint(3, 60))
        spans = None
        if rnd.random() < 0.05:  # a standing condition inside a noisy observation
            note = f" Remember: the key is under table {k}."
            spans = [(len(observation), len(observation) + len(note), G)]
            observation += note
        messages.append(msg("user", rnd.choice([K, N, N]), observation, spans))
    messages.append(msg("assistant", K, "Final answer: " + text(rnd.randint(3, 20))))
    return messages


@pytest.fixture(scope="module")
def st():
    from hsa_train.model.loading import load_tokenizer

    return SemanticTokenizer(load_tokenizer(None))


@pytest.mark.parametrize("seed", range(6))
def test_fit_long_trajectories_with_the_real_tokenizer(st, seed):
    rnd = random.Random(seed)
    tools = TOOLS if seed % 2 else None  # tool calls and results; the tool list rendered as no message's tokens
    messages = trajectory(rnd, rounds=rnd.randint(40, 90), tools=bool(tools))
    encode = st.encode_detailed
    full = len(encode(messages, tools).features["input_ids"])
    tok = st.tokenizer
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    for cutoff in (full // 6, full // 2, full - 1):
        enc, info = fit(encode, messages, tools, cutoff, TYPES, KEEP, "truncate")
        ids, labels = enc.features["input_ids"], enc.features["labels"]
        kept = [messages[i] for i in info.kept]
        assert info.action == "truncated" and len(ids) == info.tokens_after <= cutoff
        assert len(ids) == len(labels) == len(enc.features["semantic_ids"]) == len(enc.message_index)
        text = st._decode(ids)
        assert text == st.render(kept, tools=tools)
        for j, m in enumerate(kept):  # a tool result stays right after the call it answers
            if m["role"] == "tool":
                assert kept[j - 1]["role"] in ("assistant", "tool") and info.kept[j - 1] == info.kept[j] - 1
        for m in messages:  # every GLOBAL_CONDITION message (and span) is still there
            if m["semantic_type"] == G:
                assert m["content"] in text
            for start, end, name in m.get("spans") or ():
                if name == G:
                    assert m["content"][start:end] in text
        assert info.kept[-1] == len(messages) - 1  # the last reply stays, and trains
        reply = [t for t, j, lab in zip(ids, enc.message_index, labels) if j == len(kept) - 1 and lab != -100]
        assert messages[-1]["content"] in st._decode(reply)
        # whole messages only, no cut special token (without a system message the tool list makes one)
        extra = 1 if tools and kept[0]["role"] != "system" else 0
        assert ids.count(im_start) == ids.count(im_end) == len(kept) + extra
        dropped_turns = len(split_turns(messages)) - len(split_turns(kept))
        assert sum(info.turns_dropped.values()) == dropped_turns > 0
        assert set(info.turns_dropped) <= {K, N}


@pytest.mark.parametrize("seed", range(3))
def test_train_on_last_keeps_the_same_trained_tokens_under_truncation(seed):
    """With train_on=last, truncation changes the context only: the trained tokens of every cutoff are those of
    the untruncated trajectory (the last reply and its end-of-turn marker), tool calls and tool lists included."""
    from hsa_train.model.loading import load_tokenizer

    last = SemanticTokenizer(load_tokenizer(None), train_on="last")
    rnd = random.Random(seed)
    tools = TOOLS if seed % 2 else None
    messages = trajectory(rnd, rounds=rnd.randint(40, 90), tools=bool(tools))
    full = last.encode_detailed(messages, tools).features

    def trained(features):
        return [t for t, label in zip(features["input_ids"], features["labels"]) if label != -100]

    reply = last._decode(trained(full))
    assert reply == messages[-1]["content"] + "<|im_end|>\n"
    for cutoff in (len(full["input_ids"]) // 6, len(full["input_ids"]) // 2):
        enc, info = fit(last.encode_detailed, messages, tools, cutoff, TYPES, KEEP, "truncate")
        assert info.action == "truncated" and len(enc.features["input_ids"]) <= cutoff
        assert trained(enc.features) == trained(full)


def test_task_alone_too_long_and_overlong_modes(st):
    rnd = random.Random(0)
    messages = trajectory(rnd, rounds=10)
    messages[1]["content"] = "Task: " + " ".join(rnd.choice(WORDS) for _ in range(400))
    encode = st.encode_detailed
    with pytest.raises(
        ValueError, match=r"cannot fit in data.cutoff_len=128: the turns that must stay \((message 0, )?messages 1-2, "
    ):
        fit(encode, messages, None, 128, TYPES, KEEP, "truncate")
    with pytest.raises(ValueError, match=r"too long: \d+ tokens > data.cutoff_len=128"):
        fit(encode, messages, None, 128, TYPES, KEEP, "error")
    enc, info = fit(encode, messages, None, 128, TYPES, KEEP, "drop")
    assert enc is None and info.action == "dropped" and info.tokens_before > 128
    enc, info = fit(encode, messages, None, 100_000, TYPES, KEEP, "error")
    assert info.action == "fits" and enc.features == st.encode(messages)


def test_an_agent_loop_without_user_turns_loses_whole_rounds(st):
    """One task, then call / result rounds with no user message between them: each round is a turn, so old noise
    rounds go (a call with its results) and the task and the last reply stay."""
    rnd = random.Random(1)
    messages = [msg("system", G, "You are an agent."), msg("user", G, "Task: find the red key.")]
    for k in range(40):
        call = msg("assistant", K if k == 7 else N, f"Checking room {k}.")
        call["tool_calls"] = [{"type": "function", "function": {"name": "move", "arguments": {"to": k}}}]
        words = " ".join(rnd.choice(WORDS) for _ in range(20))
        messages += [call, msg("tool", N, f"room {k}: {words}")]
    messages.append(msg("assistant", K, "Final answer: the key is in room 7."))
    full = len(st.encode_detailed(messages, TOOLS).features["input_ids"])
    enc, info = fit(st.encode_detailed, messages, TOOLS, full // 3, TYPES, KEEP, "truncate")
    assert info.action == "truncated" and len(enc.features["input_ids"]) <= full // 3
    kept = info.kept
    assert kept[:2] == [0, 1] and kept[-1] == len(messages) - 1
    assert 16 in kept and 17 in kept  # the KEY_EVENT round (call 7 at 2 + 2*7, its result after it) outlives noise
    for j in kept:  # calls and results go together
        if messages[j]["role"] == "tool":
            assert j - 1 in kept
        if messages[j].get("tool_calls"):
            assert j + 1 in kept
    assert info.turns_dropped.get(N, 0) > 0 and K not in info.turns_dropped


# -- observation masking (data.noise_window) ----------------------------------------------------------------------
def reference_window(messages, keep_last, types, keep):
    """Independent statement: split into turns; a turn is noise when every type it carries is the last type; of
    the noise turns, drop all but the newest `keep_last`, except the ones that must stay (a kept type, the last
    assistant reply). Returns the kept message indices and the number of turns dropped."""
    turns, names, last_reply = reference_turns(messages)
    noise = [t for t, turn in enumerate(turns) if all(n == types[-1] for i in turn for n in names(i))]
    newest = set(noise[max(len(noise) - keep_last, 0) :])
    gone = {
        t for t in noise
        if t not in newest and last_reply not in turns[t] and not any(n in keep for i in turns[t] for n in names(i))
    }  # fmt: skip
    return [i for t, turn in enumerate(turns) if t not in gone for i in turn], len(gone)


@pytest.mark.parametrize("seed", range(8))
def test_noise_window_matches_the_reference(seed):
    rnd = random.Random(100 + seed)
    for _ in range(60):
        messages = random_conversation(rnd)
        for keep_last in (0, 1, 2, 5):
            assert window_noise(messages, keep_last, TYPES, KEEP) == reference_window(messages, keep_last, TYPES, KEEP)


def test_noise_window_keeps_the_newest_noise_and_everything_else():
    messages = [msg("system", G, "task")]
    for k in range(6):
        messages += [msg("user", N, f"obs {k}"), msg("assistant", N, f"act {k}")]
        if k == 1:
            messages += [msg("user", K, "the key is red"), msg("assistant", N, "ok")]
    kept, dropped = window_noise(messages, 2, TYPES, KEEP)
    contents = [messages[i]["content"] for i in kept]
    assert contents == ["task", "the key is red", "ok", "obs 4", "act 4", "obs 5", "act 5"]
    assert dropped == 4
    assert window_noise(messages, 100, TYPES, KEEP) == (list(range(len(messages))), 0)
    with pytest.raises(ValueError, match="noise_window=-1 must be >= 0"):
        window_noise(messages, -1, TYPES, KEEP)
