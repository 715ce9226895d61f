"""The agent runtime: sessions over a trained model, turn by turn, with the bias.

    agent = Agent(load_trained("outputs/run/model"))
    session = agent.session([{"role": "system", "content": "Task: ..."}])
    session.add({"role": "user", "content": "Obs: ..."})
    reply = agent.respond([session])[0]          # reply.message is appended to the session

Each turn the conversation is typed (saved rules; an explicit `semantic_type` wins), rendered with the generation
prompt and encoded exactly as training encodes it; the part it shares with what the session fed the model before
(tokens and types) is taken from its KV cache, and only the rest is fed (kv.py). Several sessions reply in one
batch. A conversation that would outgrow the limit (the run's `data.cutoff_len`, or `max_tokens`) with room for
the reply is cut as training cuts it (truncate.py: whole turns, the oldest noise first, keep_types and the newest
turn stay) to `cut_margin` below the limit, so that the next turns fit again, logged, and fed again from the first
token that changed. A model trained with observation masking (`data.noise_window`) sees its conversations masked
the same way each turn: only the newest N noise turns stay (the old ones leave the session for good), and the
conversation is fed again from the first turn that went.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hsa_train.agent.decoding import DecodeOptions, Decoding, Sampler
from hsa_train.agent.folder import Trained, base_model
from hsa_train.agent.kv import Batch, KVState
from hsa_train.data.rules import MessageTyper
from hsa_train.data.toolcalls import parse_tool_calls
from hsa_train.data.truncate import FitInfo, fit, window_noise
from hsa_train.model.compat import cache_argument
from hsa_train.model.settings import HSASettings

log = logging.getLogger(__name__)

OnText = Callable[[int, str, "str | None"], None]  # (index of the session or choice, new text, finish reason or None)


class ContextTooLong(ValueError):
    """A conversation (with room for its reply) over the limit, where cutting it is not wanted."""


@dataclass
class Reply:
    """One session's next assistant message, and what it cost."""

    message: dict[str, Any]  # role, content, semantic_type, type_rule (+ tool_calls)
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token or string) | "length" (max_new_tokens)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens taken from the session's cache
    cut: FitInfo | None = None  # how the conversation was cut to fit this turn, if it was

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


@dataclass
class Prompt:
    ids: list[int]
    sem: list[int]
    cut: FitInfo | None = None


@dataclass
class Session:
    """One conversation: its typed messages, its tools, and what the model holds of it (`state`)."""

    typer: MessageTyper
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[Any] | None = None
    max_tokens: int | None = None
    state: KVState = field(default_factory=KVState)
    cuts: int = 0  # times the conversation was cut to fit
    masked: int = 0  # noise turns left out by the observation window (data.noise_window)

    def add(self, *messages: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Appends messages (checked and typed as training data; an explicit semantic_type wins); returns them
        typed."""
        typed, _ = self.typer(list(messages))
        self.messages.extend(typed)
        return typed

    def fork(self) -> Session:
        """A copy that continues on its own (the state is shared, never changed in place)."""
        messages = [dict(m) for m in self.messages]
        return Session(self.typer, messages, self.tools, self.max_tokens, self.state, self.cuts, self.masked)


class Agent:
    """A trained folder run as an agent: sessions, and their replies in batches."""

    def __init__(self, trained: Trained, max_tokens: int | None = None, cut_margin: float = 0.25):
        """`cut_margin`: a cut leaves this share of the limit free, so that the next turns fit without another cut
        (each cut feeds the conversation again from the first token that changed); 0 cuts to the limit exactly."""
        if not 0.0 <= cut_margin < 1.0:
            raise ValueError(f"cut_margin={cut_margin}: give a share in [0, 1)")
        self.cut_margin = cut_margin
        if trained.st.media is not None:
            raise ValueError(
                f"{trained.path}: agent sessions run text models; a vision-language model replies through "
                "python -m hsa_train.generate"
            )
        self.trained = trained
        self.model = trained.model
        self.st = trained.st
        self.hsa = HSASettings.of(base_model(self.model)) is not None
        self.generated_type = trained.generated_type
        self.generated_id = self.st.types.id_of(self.generated_type)
        self.stop_ids = self.st.stop_token_ids()
        self.pad_id = self.st.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.stop_ids[0] if self.stop_ids else 0
        config = base_model(self.model).config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        positions = getattr(config, "max_position_embeddings", None)
        limits = [n for n in (max_tokens or trained.rules.cutoff_len, positions) if n]
        self.max_tokens = min(limits) if limits else None  # never past the positions the model has
        self.device = next(self.model.parameters()).device
        self.cache_name = cache_argument(base_model(self.model))

    def session(
        self,
        messages: Sequence[Mapping[str, Any]] = (),
        tools: Sequence[Any] | None = None,
        typing: str | None = None,
        max_tokens: int | None = None,
    ) -> Session:
        """A new session; `typing` names the training dataset whose rules type its messages (None: the default
        set); `max_tokens` overrides the limit it is cut to."""
        typer = self.trained.typer(typing)
        typed, tools = typer(list(messages), tools)
        return Session(typer, typed, tools, max_tokens)

    # -- one turn ------------------------------------------------------------------------------------------------
    def prompt(self, session: Session, reserve: int = 0, cut: bool = True) -> Prompt:
        """The session's prompt, the conversation cut first when it and `reserve` tokens exceed the limit (with
        `cut=False`, a ContextTooLong instead)."""
        if self.trained.rules.noise_window is not None:
            self._mask(session)
        encoded = self.st.encode_prompt(session.messages, session.tools, generated_type=self.generated_type)
        limit = session.max_tokens or self.max_tokens
        if limit is None or len(encoded["input_ids"]) + reserve <= limit:
            return Prompt(encoded["input_ids"], encoded["semantic_ids"])
        if not cut or reserve >= limit:
            raise ContextTooLong(
                f"the conversation takes {len(encoded['input_ids'])} tokens and the reply up to {reserve}: over the "
                f"model's limit of {limit} tokens; send fewer messages or a smaller max_tokens"
            )
        budget = max(int(limit * (1.0 - self.cut_margin)) - reserve, 1)
        info = self._cut(session, len(encoded["input_ids"]), budget)
        encoded = self.st.encode_prompt(session.messages, session.tools, generated_type=self.generated_type)
        if len(encoded["input_ids"]) > budget:
            raise ValueError(
                f"the conversation takes {len(encoded['input_ids'])} tokens after cutting, over the {budget} "
                f"left for the prompt (limit {limit}, {reserve} for the reply, margin {self.cut_margin:.0%})"
            )
        return Prompt(encoded["input_ids"], encoded["semantic_ids"], info)

    def _with_reply(self, session: Session) -> list[dict[str, Any]]:
        """The session's messages and an empty reply: the conversation as training saw it, the reply to come in
        its newest turn (the turn that must stay)."""
        return [*session.messages, {"role": "assistant", "content": "", "semantic_type": self.generated_type}]

    def _mask(self, session: Session) -> None:
        """Leaves out the noise turns older than the newest `noise_window`, as training did (the reply to come
        belongs to the newest turn, as the trained reply did)."""
        conversation = self._with_reply(session)
        names, rules = self.st.types.names, self.trained.rules
        kept, masked = window_noise(conversation, rules.noise_window, names, rules.keep_types, self.st.types.default)
        if masked:
            session.messages = [session.messages[i] for i in kept if i < len(session.messages)]
            session.masked += masked

    def _cut(self, session: Session, prompt_len: int, budget: int) -> FitInfo:
        """Cuts the session's messages as training cuts a sample to `budget` prompt tokens (raises when what must
        stay does not fit)."""
        conversation = self._with_reply(session)
        full = len(self.st.encode_detailed(conversation, session.tools).features["input_ids"])
        names = self.st.types.names
        rules = self.trained.rules
        try:
            _, info = fit(
                self.st.encode_detailed,
                conversation,
                session.tools,
                budget + full - prompt_len,
                types_order=names,
                keep_types=rules.keep_types,
                default_type=self.st.types.default,
            )
        except ValueError as exc:
            raise ValueError(f"the conversation cannot be cut to fit: {exc}") from None
        kept = [i for i in info.kept if i < len(session.messages)]
        session.messages = [session.messages[i] for i in kept]
        session.cuts += 1
        dropped = ", ".join(f"{n} {name}" for name, n in sorted(info.turns_dropped.items()))
        log.info(
            "session cut to fit %d prompt tokens: %d -> %d tokens, turns dropped: %s",
            budget,
            prompt_len,
            info.tokens_after - (full - prompt_len),
            dropped,
        )
        return info

    @torch.no_grad()
    def start(self, sessions: Sequence[Session], prompts: Sequence[Prompt], room: int = 0) -> Batch:
        """One forward over the sessions' new tokens; the batch holds each one's next-token logits (`room`: the
        tokens decoding will add, reserved in its cache)."""
        return Batch(
            self.model,
            [(p.ids, p.sem) for p in prompts],
            [s.state for s in sessions],
            self.pad_id,
            self.st.types.default_id,
            hsa=self.hsa,
            cache_name=self.cache_name,
            room=room,
        )

    @torch.no_grad()
    def respond(
        self,
        sessions: Sequence[Session],
        options: DecodeOptions | Sequence[DecodeOptions] | None = None,
        on_text: OnText | None = None,
        prompts: Sequence[Prompt] | None = None,
    ) -> list[Reply]:
        """Each session's next assistant message, decoded together, appended to its session (`prompts`: their
        prompts when the caller encoded them already)."""
        if not sessions:
            return []
        options = list(options) if isinstance(options, Sequence) else [options or DecodeOptions()] * len(sessions)
        if len(options) != len(sessions):
            raise ValueError(f"{len(options)} decoding options for {len(sessions)} sessions")
        if prompts is None:
            prompts = [self.prompt(s, o.max_new_tokens) for s, o in zip(sessions, options)]
        batch = self.start(sessions, prompts, room=max(o.max_new_tokens for o in options) - 1)
        decodings = [Decoding(self._decode, o, self.stop_ids) for o in options]
        samplers = [Sampler(o, self.device) for o in options]
        active = list(range(len(sessions)))
        while True:
            for j, i in enumerate(active):
                decodings[i].add(samplers[i](batch.logits[j]))
                if on_text is not None:
                    delta = decodings[i].delta()
                    if delta or decodings[i].done:
                        on_text(i, delta, decodings[i].finish_reason)
            still = []
            for j, i in enumerate(active):
                if decodings[i].done:
                    sessions[i].state = batch.state(j)
                else:
                    still.append(j)
            if not still:
                break
            if len(still) < len(active):
                batch.keep(still)
                active = [active[j] for j in still]
            batch.step([decodings[i].tokens[-1] for i in active], self.generated_id)
        replies = []
        for session, prompt, decoding, cached in zip(sessions, prompts, decodings, batch.shared):
            message = self._message(session, decoding.text)
            session.messages.append(message)
            replies.append(Reply(message, decoding.tokens, decoding.finish_reason, len(prompt.ids), cached, prompt.cut))
        return replies

    def _decode(self, ids: list[int]) -> str:
        return self.st.tokenizer.decode(ids, skip_special_tokens=True).lstrip()

    def _message(self, session: Session, text: str) -> dict[str, Any]:
        """The reply as a typed assistant message (typed by the rules, as an assistant message in the data was)."""
        content, calls = parse_tool_calls(text) if session.tools else (text, [])
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = calls
        typed, _ = session.typer([message])
        return typed[0]
