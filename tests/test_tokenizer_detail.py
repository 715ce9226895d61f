"""SemanticTokenizer in detail (issue 9): typed spans, message_index, tools and tool calls, segments in linear time.

Every expectation is computed here, apart from the code under test: prefix renders through apply_chat_template,
each token's first character from the tokens' own bytes, a type per character from character ranges.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import vocabs

from hsa_train.data import IGNORE_INDEX, SemanticTokenizer
from hsa_train.data.toolcalls import TOOLS_FALLBACK_NOTE
from hsa_train.types import DEFAULT_TYPES

G, K, N = (DEFAULT_TYPES.index(t) for t in ("GLOBAL_CONDITION", "KEY_EVENT", "PROCESS_NOISE"))
DEFAULT = "PROCESS_NOISE"

# Qwen2.5-Instruct's chat template (tokenizer_config.json of Qwen/Qwen2.5-*-Instruct), tool-aware: tools go into the
# system prompt, tool calls into the assistant turn as <tool_call> JSON, tool results into a user turn.
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

TEMPLATES = {"chatml": vocabs.TEMPLATES["chatml"], "llama3": vocabs.TEMPLATES["llama3"], "qwen25": QWEN25_TEMPLATE}
TRIMS = {"llama3"}  # templates that render content | trim


def with_template(tokenizer, name: str):
    tokenizer.chat_template = TEMPLATES[name]
    return tokenizer


def render_ref(tokenizer, messages, tools=None, gen=False) -> str:
    """apply_chat_template on what a template is given: role, content, tool_calls."""
    if not messages and not gen:
        return ""
    plain = [{k: m[k] for k in ("role", "content", "tool_calls") if k in m} for m in messages]
    return tokenizer.apply_chat_template(plain, tools=tools, tokenize=False, add_generation_prompt=gen)


def char_types(tokenizer, messages, tools=None, trims=False, source=None) -> tuple[str, list[int], list[int]]:
    """The full render, and per character its type id and its message (`source[j]` for rendered message j).
    A segment is what one more message adds; a span's characters are found by locating the (trimmed) content in
    its segment, which must hold it once."""
    source = list(range(len(messages))) if source is None else source
    full = render_ref(tokenizer, messages, tools)
    bounds = [len(render_ref(tokenizer, messages[:j], tools)) for j in range(len(messages) + 1)]
    types, owner = [], []
    for j, m in enumerate(messages):
        own = DEFAULT_TYPES.index(m.get("semantic_type") or DEFAULT)
        segment = full[bounds[j] : bounds[j + 1]]
        seg_types = [own] * len(segment)
        if m.get("spans"):
            visible = m["content"].strip() if trims else m["content"]
            assert segment.count(visible) == 1, "test data: the content must occur once in its segment"
            at, shift = segment.index(visible), m["content"].index(visible)
            for start, end, name in m["spans"]:
                for c in range(max(start, shift), min(end, shift + len(visible))):
                    seg_types[at + c - shift] = DEFAULT_TYPES.index(name)
        types += seg_types
        owner += [source[j]] * len(segment)
    assert len(types) == len(full)
    return full, types, owner


def expected_per_token(tokenizer, ids, messages, tools=None, trims=False, source=None):
    full, types, owner = char_types(tokenizer, messages, tools, trims, source)
    starts = vocabs.token_start_chars(tokenizer, ids, full)
    return [types[c] for c in starts], [owner[c] for c in starts], starts


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_text(tokenizer, features) -> str:
    return decode(
        tokenizer, [t for t, label in zip(features["input_ids"], features["labels"]) if label != IGNORE_INDEX]
    )


# -- typed spans: exact alignment on real vocabularies ---------------------------------------------------------------

SPAN_CONVERSATION = [
    {"role": "system", "content": "You are a careful household robot.", "semantic_type": "GLOBAL_CONDITION"},
    {
        "role": "user",
        "content": "Task: find the suspiciouslyShinyApple near the refrigerator door.",
        "semantic_type": "GLOBAL_CONDITION",
        # starts inside "suspiciouslyShinyApple" and ends inside "refrigerator"
        "spans": [(22, 48, "KEY_EVENT")],
    },
    {
        "role": "assistant",
        "content": "  Moving forward to the kitchen counter now.  ",
        "semantic_type": "PROCESS_NOISE",
    },
    {
        "role": "tool",
        "content": "  noise noise OBSERVED:applesauce_jar_unopened noise 任务：把苹果放进冰箱 🍎 noise  ",
        "semantic_type": "PROCESS_NOISE",
        # "apple|sauce_jar_unop|ened", "把|苹果放进冰箱 🍎"
        "spans": [(28, 42, "KEY_EVENT"), (57, 65, "GLOBAL_CONDITION")],
    },
    {
        "role": "assistant",
        "content": "Picking up thejar.<|im_end|> done",
        "semantic_type": "KEY_EVENT",
        "spans": [(14, 22, "GLOBAL_CONDITION")],  # inside "thejar" to inside "<|im_end|>" (plain text)
    },
]


@pytest.mark.parametrize("template", ["chatml", "llama3", "qwen25"])
@pytest.mark.parametrize("vocab", ["qwen25", "gpt2_bpe"])
def test_span_types_match_a_brute_force_reference(request, vocab, template):
    tok = with_template(request.getfixturevalue(vocab), template)
    enc = SemanticTokenizer(tok).encode_detailed(SPAN_CONVERSATION)
    ids = enc.features["input_ids"]
    types, owners, starts = expected_per_token(tok, ids, SPAN_CONVERSATION, trims=template in TRIMS)
    assert decode(tok, ids) == render_ref(tok, SPAN_CONVERSATION)
    assert enc.features["semantic_ids"] == types
    assert enc.message_index == owners
    assert len(ids) == len(enc.features["labels"]) == len(enc.message_index)

    # the case this test is about: tokens straddle span boundaries; each takes the type of its first character
    full = render_ref(tok, SPAN_CONVERSATION)
    ends = [*starts[1:], len(full)]
    straddling = 0
    for j, m in enumerate(SPAN_CONVERSATION):
        segment_start = len(render_ref(tok, SPAN_CONVERSATION[:j]))
        visible = m["content"].strip() if template in TRIMS else m["content"]
        at = full.index(visible, segment_start) - m["content"].index(visible)
        for start, end, name in m.get("spans", []):
            for boundary, inside in ((at + start, name), (at + end, m["semantic_type"])):
                t = next(t for t in range(len(ids)) if starts[t] <= boundary < ends[t])
                if starts[t] < boundary:
                    straddling += 1
                    outside = m["semantic_type"] if inside == name else name
                    assert enc.features["semantic_ids"][t] == DEFAULT_TYPES.index(outside)
                else:
                    assert enc.features["semantic_ids"][t] == DEFAULT_TYPES.index(inside)
    assert straddling >= 2


def test_span_types_with_the_shipped_tokenizer(tokenizer):
    enc = SemanticTokenizer(tokenizer).encode_detailed(SPAN_CONVERSATION)
    types, owners, _ = expected_per_token(tokenizer, enc.features["input_ids"], SPAN_CONVERSATION)
    assert enc.features["semantic_ids"] == types
    assert enc.message_index == owners


# -- encode_detailed ---------------------------------------------------------------------------------------------------


def test_encode_detailed_agrees_with_encode_and_counts_tokens_per_message(tokenizer):
    messages = [
        {"role": "user", "content": "Task: pick up the apple.", "semantic_type": "GLOBAL_CONDITION", "type_rule": "x"},
        {"role": "assistant", "content": "Going.", "semantic_type": None},
        {"role": "user", "content": "ok", "semantic_type": "KEY_EVENT"},
        {"role": "assistant", "content": "Done.", "semantic_type": "KEY_EVENT"},
    ]
    st = SemanticTokenizer(tokenizer)
    enc = st.encode_detailed(messages)
    assert st.encode(messages) == enc.features
    assert st.encode_with_answer(messages) == (enc.features, enc.answer)
    assert sorted(set(enc.message_index)) == [0, 1, 2, 3]
    assert enc.message_index == sorted(enc.message_index)  # segments follow each other
    for j in range(len(messages)):
        segment = render_ref(tokenizer, messages[: j + 1])[len(render_ref(tokenizer, messages[:j])) :]
        assert enc.message_index.count(j) == len(tokenizer(segment, add_special_tokens=False)["input_ids"])


def test_extra_keys_never_reach_the_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
    messages = [
        {
            "role": "user",
            "content": "hi",
            "semantic_type": "KEY_EVENT",
            "type_rule": "explicit",
            "spans": [(0, 1, "KEY_EVENT")],
        },
        {"role": "assistant", "content": "hello", "semantic_type": None, "type_rule": "default", "weight": 2},
    ]
    st = SemanticTokenizer(tok)
    text = st.render(messages)
    assert text == '{"role": "user", "content": "hi"}\n{"role": "assistant", "content": "hello"}\n'
    assert decode(tok, st.encode(messages)["input_ids"]) == text


@pytest.mark.parametrize(
    "spans, problem",
    [
        ([(0, 99, "KEY_EVENT")], "message 1: span"),
        ([(3, 1, "KEY_EVENT")], "message 1: span"),
        ([(0, 3, "URGENT")], "message 1: .*URGENT"),
        ([(0, 3, "KEY_EVENT"), (2, 5, "KEY_EVENT")], "message 1: spans overlap"),
        (["oops"], "message 1: a span is"),
    ],
)
def test_bad_spans(tokenizer, spans, problem):
    messages = [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "answer", "spans": spans},
    ]
    with pytest.raises(ValueError, match=problem) as error:
        SemanticTokenizer(tokenizer).encode(messages)
    assert "\n" not in str(error.value)


def test_spans_in_content_the_template_rewrites_are_refused_in_one_line(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | replace('a', 'b') }}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    st = SemanticTokenizer(tok)
    fine = [{"role": "user", "content": "xyz", "spans": [(0, 1, "KEY_EVENT")]}, {"role": "assistant", "content": "a"}]
    enc = st.encode_detailed(fine)
    starts = vocabs.token_start_chars(tok, enc.features["input_ids"], st.render(fine))
    assert enc.features["semantic_ids"][starts.index(len("<|im_start|>user\n"))] == K  # "x" is placed
    bad = [{"role": "user", "content": "data", "spans": [(0, 1, "KEY_EVENT")]}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ValueError, match="message 0: the chat template rewrites its content") as error:
        st.encode(bad)
    assert "\n" not in str(error.value)


# -- tools and tool calls --------------------------------------------------------------------------------------------

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CLOCK = {"name": "time_in", "description": "Local time in a city", "parameters": {"type": "object", "properties": {}}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": CLOCK}]


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather and time in Zürich?", "semantic_type": "GLOBAL_CONDITION"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [call("get_weather", city="Zürich")],
        "semantic_type": "KEY_EVENT",
    },
    {"role": "tool", "content": '{"temp_c": 21, "sky": "clear"}', "semantic_type": "KEY_EVENT"},
    {
        "role": "assistant",
        "content": "Now the time.",
        "tool_calls": [call("time_in", city="Zürich"), call("get_weather", city="Bern")],
        "semantic_type": "PROCESS_NOISE",
    },
    {"role": "tool", "content": "14:05", "semantic_type": "PROCESS_NOISE"},
    {"role": "assistant", "content": "21 °C and clear; it is 14:05.", "semantic_type": "KEY_EVENT"},
]


def assistant_turns(tokenizer, messages, tools=None) -> str:
    """What each assistant message adds after its generation prompt, concatenated: the trained text."""
    out = ""
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            out += render_ref(tokenizer, messages[: j + 1], tools)[
                len(render_ref(tokenizer, messages[:j], tools, True)) :
            ]
    return out


@pytest.mark.parametrize("vocab", ["qwen25", "gpt2_bpe"])
def test_a_tool_aware_template_renders_tools_itself(request, vocab):
    tok = with_template(request.getfixturevalue(vocab), "qwen25")
    st = SemanticTokenizer(tok)
    assert st.renders_tools and st.tools_note is None
    enc = st.encode_detailed(TOOL_CONVERSATION, TOOLS)
    ids, labels = enc.features["input_ids"], enc.features["labels"]
    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=TOOLS, tokenize=False)
    assert decode(tok, ids) == st.render(TOOL_CONVERSATION, tools=TOOLS) == text
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in text and "<tools>" in text
    # the tool-call turns are trained, the tool results are not
    trained = trained_text(tok, enc.features)
    assert trained == assistant_turns(tok, TOOL_CONVERSATION, TOOLS)
    assert trained.startswith('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>')
    assert "temp_c" not in trained and "14:05<" not in trained and "<tool_response>" not in trained
    for t, (label, owner) in enumerate(zip(labels, enc.message_index)):
        if TOOL_CONVERSATION[owner]["role"] == "tool":
            assert label == IGNORE_INDEX, t
    types, owners, _ = expected_per_token(tok, ids, TOOL_CONVERSATION, TOOLS)
    assert enc.features["semantic_ids"] == types and enc.message_index == owners
    # bare function schemas (LLaMA-Factory's) are wrapped the OpenAI way
    assert st.encode_detailed(TOOL_CONVERSATION, [WEATHER, CLOCK]) == enc


def test_the_fast_render_is_checked_per_template_with_and_without_tools(gpt2_bpe):
    """The compiled template run directly is compared with apply_chat_template on each template's first
    conversations without tools and, separately, with tools: a difference only with tools is caught there."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    tok = with_template(gpt2_bpe, "qwen25")
    plain = [TOOL_CONVERSATION[0], {"role": "assistant", "content": "Which city?"}]
    reference = SemanticTokenizer(tok)
    expected = [reference.encode_detailed(plain), reference.encode_detailed(TOOL_CONVERSATION, TOOLS)]

    st = SemanticTokenizer(tok)  # its compiled template differs from the real one only when tools are given
    st._compiled = (tok.chat_template, _compile_jinja_template("{% if tools %} {% endif %}" + tok.chat_template))
    for _ in range(4):
        assert st.encode_detailed(plain) == expected[0]
    checks = st._template_checks(tok.chat_template)
    assert st._fast_ok and checks.fast_checks == [0, 3]  # three compared, the fourth trusted
    assert st.encode_detailed(TOOL_CONVERSATION, TOOLS) == expected[1]
    assert not st._fast_ok


def hermes(content, calls) -> str:
    if not calls:
        return content
    blocks = [
        "<tool_call>\n"
        + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
        + "\n</tool_call>"
        for c in calls
    ]
    return content + ("\n" if content else "") + "\n".join(blocks)


TOOLS_TEXT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + "\n".join(json.dumps(t, ensure_ascii=False) for t in TOOLS)
    + "\n</tools>"
)


def test_a_template_without_tools_gets_them_as_text(tokenizer):
    """The shipped tokenizer's bare ChatML: tools in a new first system message, calls in the assistant's content."""
    st = SemanticTokenizer(tokenizer)
    assert not st.renders_tools
    assert (
        st.tools_note
        == TOOLS_FALLBACK_NOTE
        == (
            "the chat template does not render tools; tool calls are written as <tool_call> JSON in the assistant's "
            "content (Hermes style)"
        )
    )
    as_text = [{"role": "system", "content": TOOLS_TEXT}] + [
        {"role": m["role"], "content": hermes(m["content"], m.get("tool_calls", []))} for m in TOOL_CONVERSATION
    ]
    expected = render_ref(tokenizer, as_text)
    assert "Zürich" in expected and '"arguments": {"city": "Zürich"}}\n</tool_call>\n<tool_call>\n' in expected
    assert as_text[4]["content"].startswith("Now the time.\n<tool_call>\n")
    assert as_text[2]["content"].startswith("<tool_call>\n")
    enc = st.encode_detailed(TOOL_CONVERSATION, TOOLS)
    ids = enc.features["input_ids"]
    assert st.render(TOOL_CONVERSATION, tools=TOOLS) == decode(tokenizer, ids) == expected
    assert trained_text(tokenizer, enc.features) == assistant_turns(tokenizer, as_text)
    # the inserted system message is no record message: index -1 and the default type
    as_text[0]["semantic_type"] = None
    source = [-1, *range(len(TOOL_CONVERSATION))]
    types, owners, _ = expected_per_token(
        tokenizer,
        ids,
        [as_text[0]] + [dict(m, content=t["content"]) for m, t in zip(TOOL_CONVERSATION, as_text[1:])],
        source=source,
    )
    assert enc.message_index == owners and enc.features["semantic_ids"] == types
    n_system = len(tokenizer(render_ref(tokenizer, as_text[:1]), add_special_tokens=False)["input_ids"])
    assert enc.message_index[:n_system] == [-1] * n_system and enc.message_index[n_system] == 0
    assert enc.features["semantic_ids"][:n_system] == [DEFAULT_TYPES.index(DEFAULT)] * n_system


def test_the_tools_text_joins_a_first_system_message(tokenizer):
    st = SemanticTokenizer(tokenizer)
    messages = [{"role": "system", "content": "Be brief.", "semantic_type": "GLOBAL_CONDITION"}, *TOOL_CONVERSATION]
    text = st.render(messages, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n" + TOOLS_TEXT + "<|im_end|>\n<|im_start|>user\n")
    enc = st.encode_detailed(messages, TOOLS)
    n_system = len(tokenizer(text[: text.index("<|im_start|>user")], add_special_tokens=False)["input_ids"])
    assert enc.message_index[:n_system] == [0] * n_system and -1 not in enc.message_index
    assert enc.features["semantic_ids"][:n_system] == [G] * n_system
    empty = [{"role": "system", "content": ""}, *TOOL_CONVERSATION]
    assert st.render(empty, tools=TOOLS).startswith("<|im_start|>system\n" + TOOLS_TEXT + "<|im_end|>")


def test_tool_call_text_in_content_is_plain_text_but_not_in_a_template_tool_call(tokenizer, gpt2_bpe):
    sneaky = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": [call("f", x="<|im_end|>")]},
    ]
    features = SemanticTokenizer(tokenizer).encode(sneaky)  # written as content: plain text
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert features["input_ids"].count(im_end) == 2
    assert decode(tokenizer, features["input_ids"]) == SemanticTokenizer(tokenizer).render(sneaky)
    with pytest.raises(ValueError, match="message 1: a tool call holds the special-token text") as error:
        SemanticTokenizer(with_template(gpt2_bpe, "qwen25")).encode(sneaky)
    assert "\n" not in str(error.value)


def test_glaive_tool_calls_train_with_the_shipped_tokenizer(tokenizer, peer_data):
    """LLaMA-Factory's glaive demo, converted by hand: function_call -> assistant tool call, observation -> tool."""
    records = json.loads((peer_data / "glaive_toolcall_en_demo.json").read_text())
    record = next(r for r in records if any(t["from"] == "function_call" for t in r["conversations"]))
    roles = {"human": "user", "gpt": "assistant", "observation": "tool"}
    messages = []
    for turn in record["conversations"]:
        if turn["from"] == "function_call":
            fn = json.loads(turn["value"])
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": fn}]})
        else:
            messages.append({"role": roles[turn["from"]], "content": turn["value"]})
    tools = json.loads(record["tools"])
    st = SemanticTokenizer(tokenizer)
    enc = st.encode_detailed(messages, tools)
    trained = trained_text(tokenizer, enc.features)
    fn = next(m for m in messages if m.get("tool_calls"))["tool_calls"][0]["function"]
    assert (
        "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn["arguments"]}) + "\n</tool_call>" in trained
    )
    observation = next(m for m in messages if m["role"] == "tool")["content"]
    assert observation not in trained
    assert decode(tokenizer, enc.features["input_ids"]) == st.render(messages, tools=tools)
    assert st.render(messages, tools=tools).startswith("<|im_start|>system\n# Tools\n")


# -- segments in linear time: windows, checked ---------------------------------------------------------------------

WORDS = "the robot moves to kitchen picks red apple table waits door opens 任务 苹果 déjà naïve 👍 <|im_end|>".split()


def random_conversation(rng: random.Random, n: int, qwen: bool) -> list[dict]:
    """Mixed roles (system, user, assistant with and without tool calls, tool), typed spans, whitespace the
    templates may trim, special-token text in content. Qwen2.5's template is not prefix-stable on two tool results
    in a row (it closes the turn only after the last), so `qwen` conversations have none."""
    messages = []
    for j in range(n):
        roles = ["user", "assistant", "assistant", "tool", "system"]
        if j == 0:
            roles = ["user", "system"]
        if qwen and messages and messages[-1]["role"] == "tool":
            roles.remove("tool")
        role = rng.choice(roles)
        words = [rng.choice(WORDS) for _ in range(rng.randint(0, 12))]
        content = rng.choice(["", " ", "\n"]) + " ".join(words) + f" m{j}" + rng.choice(["", "  ", "\n\n"])
        message = {"role": role, "content": content, "semantic_type": rng.choice([None, *DEFAULT_TYPES])}
        if rng.random() < 0.4:
            a = rng.randrange(len(content))
            b = rng.randrange(a, len(content) + 1)
            message["spans"] = [(a, b, rng.choice(DEFAULT_TYPES))]
        if role == "assistant" and rng.random() < 0.4:
            message["tool_calls"] = [call(rng.choice(["get_weather", "time_in"]), city=rng.choice(WORDS[:-1]))]
            if rng.random() < 0.3:
                message["content"], message.pop("spans", None)
        messages.append(message)
    return messages


def exhaustive(st: SemanticTokenizer) -> SemanticTokenizer:
    """`st` with windows off for every template: each message after all its predecessors (SPEC §2 as written)."""
    st.window_chunk = 10**9
    return st


def both_ways(st, messages, tools):
    """(windowed, exhaustive) Segments of one conversation, from the same renderer."""
    inp = st.prepare(messages, tools)
    render = st._fast_render(st._source(inp.tools), inp.tools)
    locate = {k for k, i in enumerate(inp.source) if i >= 0 and messages[i].get("spans")}
    out = []
    for windowed in (True, False):
        try:
            out.append(st._compute(inp.messages, locate, render, windowed, str))
        except ValueError as error:
            out.append(str(error))
    return tuple(out)


@pytest.mark.parametrize("window", [(4, 8), (1, 2)])  # (window_context, window_chunk): the default and the least
@pytest.mark.parametrize("template", ["chatml", "llama3", "qwen25"])
def test_windowed_segments_equal_the_exhaustive_ones(gpt2_bpe, template, window):
    tok = with_template(gpt2_bpe, template)
    st = SemanticTokenizer(tok)
    st.window_context, st.window_chunk = window
    rng = random.Random(f"{template}{window}")
    windowed_some = refused = 0
    for _ in range(60):
        messages = random_conversation(rng, rng.randint(1, 40), qwen=template == "qwen25")
        tools = TOOLS if rng.random() < 0.5 else None
        windowed, reference = both_ways(st, messages, tools)
        assert windowed == reference
        if isinstance(reference, str):  # refused, the same way
            refused += 1
            continue
        inp = st.prepare(messages, tools)
        assert reference.text == render_ref(tok, inp.messages, inp.tools)
        assert reference.starts == [len(render_ref(tok, inp.messages[:j], inp.tools)) for j in range(len(inp.messages))]
        windowed_some += len(inp.messages) > st.window_chunk
    assert windowed_some > 30 and refused < 10


@pytest.mark.parametrize("template", ["chatml", "llama3", "qwen25"])
def test_encodings_with_windows_equal_those_without(gpt2_bpe, template):
    tok = with_template(gpt2_bpe, template)
    windowed, reference = SemanticTokenizer(tok), exhaustive(SemanticTokenizer(tok))
    rng = random.Random(template)
    checked = 0
    for _ in range(40):
        messages = random_conversation(rng, rng.randint(10, 40), qwen=template == "qwen25")
        messages.append({"role": "assistant", "content": "final answer", "semantic_type": "KEY_EVENT"})
        tools = TOOLS if rng.random() < 0.5 else None
        expected = reference.encode_detailed(messages, tools)
        assert windowed.encode_detailed(messages, tools) == expected
        checked += 1
        if checked == 5:  # the template passed its checks: from here on windows alone (and the full-render check)
            assert windowed._checks[windowed._source(None)].checks_left == 0
    assert windowed._checks[windowed._source(None)].window_ok


# Not window-local: turn numbers (loop.index) in every header and in the generation prompt.
NUMBERED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + loop.index|string + '\n' + m['content'] }}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant ' + (messages|length + 1)|string + '\n' }}{% endif %}"
)
# Not window-local, and the text does not show it: the generation prompt is shorter after 9 messages (both are
# prefixes of the assistant's header), so windows (which hold fewer) would cut the trained text elsewhere.
LATE_PROMPT = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' if messages|length < 10 else '<|im_start|>' }}"
    "{% endif %}"
)


@pytest.mark.parametrize("template", [NUMBERED, LATE_PROMPT])
def test_a_template_that_is_not_window_local_falls_back_for_good(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    rng = random.Random(0)
    conversations = [
        [{"role": ("user", "assistant")[j % 2], "content": f"turn {j} " + rng.choice(WORDS[:-1])} for j in range(n)]
        for n in (30, 24, 4, 31, 2, 40)
    ]
    st, reference = SemanticTokenizer(tok), exhaustive(SemanticTokenizer(tok))
    windowed, right = both_ways(st, conversations[0], None)
    assert windowed != right  # the premise: windows would get it wrong
    for messages in conversations:
        assert st.encode_detailed(messages) == reference.encode_detailed(messages)
    assert not st._checks[st._source(None)].window_ok
    # the exhaustive result is SPEC §2's: segments from prefix renders
    messages = conversations[0]
    enc = st.encode_detailed(messages)
    types, owners, _ = expected_per_token(tok, enc.features["input_ids"], messages)
    assert enc.message_index == owners
    assert trained_text(tok, enc.features) == assistant_turns(tok, messages)


def test_the_full_render_check_alone_catches_a_text_difference(tokenizer):
    """With the per-template checks used up, a window that changes the text still cannot get through."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = NUMBERED
    st = SemanticTokenizer(tok)
    st._template_checks(st._source(None)).checks_left = 0
    messages = [{"role": ("user", "assistant")[j % 2], "content": f"turn {j}"} for j in range(20)]
    assert st.encode_detailed(messages) == exhaustive(SemanticTokenizer(tok)).encode_detailed(messages)
    assert not st._checks[st._source(None)].window_ok


def test_a_prefix_unstable_template_is_refused_with_windows_too(gpt2_bpe):
    tok = with_template(gpt2_bpe, "qwen25")
    messages = [{"role": "user", "content": "go"}]
    for j in range(12):
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [call("time_in", city="Bern")]},
            {"role": "tool", "content": f"{j}:00"},
        ]
    messages[-3:-1] = [{"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}]  # two results in a row
    messages.append({"role": "assistant", "content": "done"})
    st = SemanticTokenizer(tok)
    with pytest.raises(ValueError, match="not prefix-stable"):
        st.encode(messages, TOOLS)
    assert st._checks[st._source(TOOLS)].window_ok  # the template's fault, not the windows'


class CountingTemplate:
    """A compiled template that counts its renders and the messages they render."""

    def __init__(self, compiled, counts):
        self.compiled, self.counts = compiled, counts

    def render(self, **kwargs):
        self.counts["calls"] += 1
        self.counts["messages"] += len(kwargs["messages"])
        return self.compiled.render(**kwargs)


def render_cost(st, tok, messages) -> dict:
    counts = {"calls": 0, "messages": 0}
    apply = tok.apply_chat_template

    def counting_apply(conversation, *args, **kwargs):
        counts["calls"] += 1
        counts["messages"] += len(conversation)
        return apply(conversation, *args, **kwargs)

    tok.apply_chat_template = counting_apply
    compiled = st._compiled
    st._compiled = (compiled[0], CountingTemplate(compiled[1], counts))
    try:
        st.encode(messages)
    finally:
        st._compiled = compiled
        del tok.apply_chat_template
    return counts


def test_render_cost_grows_linearly_with_the_number_of_messages(tokenizer):
    tok = copy.deepcopy(tokenizer)

    def conversation(n):
        return [{"role": ("user", "assistant")[j % 2], "content": f"message {j}"} for j in range(n)]

    st, reference = SemanticTokenizer(tok), exhaustive(SemanticTokenizer(tok))
    for _ in range(st.window_checks):  # the template's checks against the exhaustive method come first
        st.encode(conversation(20))
        reference.encode(conversation(20))
    cost = {n: render_cost(st, tok, conversation(n)) for n in (40, 400)}
    quadratic = {n: render_cost(reference, tok, conversation(n)) for n in (40, 400)}
    assert cost[400]["calls"] <= 10 * cost[40]["calls"]  # linear (so are the exhaustive calls: each renders a prefix)
    assert cost[400]["messages"] < 12 * cost[40]["messages"]  # linear: about 17 per message (windows of 5 to 13)
    assert cost[400]["messages"] < 20 * 400
    assert quadratic[400]["messages"] > 80 * quadratic[40]["messages"]  # every prefix: 100x for 10x messages
    assert cost[400]["messages"] * 15 < quadratic[400]["messages"]
    print("render cost (calls, messages rendered):", cost, "exhaustive:", quadratic)


def test_spans_as_dicts_and_tools_as_json_text(tokenizer):
    st = SemanticTokenizer(tokenizer)
    as_dicts = [
        dict(m, spans=[{"start": a, "end": b, "semantic_type": t} for a, b, t in m["spans"]]) if "spans" in m else m
        for m in SPAN_CONVERSATION
    ]
    assert st.encode_detailed(as_dicts) == st.encode_detailed(SPAN_CONVERSATION)
    assert st.encode_detailed(TOOL_CONVERSATION, json.dumps([WEATHER, CLOCK])) == st.encode_detailed(
        TOOL_CONVERSATION, TOOLS
    )
    with pytest.raises(ValueError, match="tools is not JSON"):
        st.encode(TOOL_CONVERSATION, "[{oops")
    with pytest.raises(ValueError, match="tools must be a list"):
        st.encode(TOOL_CONVERSATION, WEATHER)


def test_tool_support_is_probed_once_per_template(tokenizer, gpt2_bpe):
    for tok, native in ((copy.deepcopy(tokenizer), False), (with_template(gpt2_bpe, "qwen25"), True)):
        st = SemanticTokenizer(tok)
        probes = count_probes(st)
        for _ in range(3):
            st.encode(TOOL_CONVERSATION, TOOLS)
        assert st.renders_tools is native
        assert len(probes) == 1  # one probe render (tools and a call together) for the template


def count_probes(st) -> list:
    """Records the renders that name a template explicitly (only the tool-support probe does)."""
    probes, apply = [], st._apply

    def counting(*args, chat_template=None, **kwargs):
        if chat_template is not None:
            probes.append(chat_template)
        return apply(*args, chat_template=chat_template, **kwargs)

    st._apply = counting
    return probes
