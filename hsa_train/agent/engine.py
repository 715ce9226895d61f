"""Many callers, one model: requests queue, and one worker thread answers every request waiting in one batch
(`Agent.respond`), reusing cached prefixes.

A request is stateless (the whole conversation each time, as the OpenAI API sends it); the `PrefixCache` keeps
the KV states of recent conversations, so a request that extends one (the next turn of an agent loop) feeds only
its new tokens. Every model call, and every encoding (the SemanticTokenizer is not shared across threads), runs on
the worker.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from hsa_train.agent.decoding import DecodeOptions
from hsa_train.agent.kv import KVState
from hsa_train.agent.session import Agent, OnText, Reply

log = logging.getLogger(__name__)


class PrefixCache:
    """Recent sessions' KV states, least recently used evicted first, within `budget_bytes`."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[int, KVState] = OrderedDict()
        self.bytes = 0
        self.lookups = self.hits = self.tokens_reused = self.prompt_tokens = self.evictions = 0
        self._next = 0

    def lookup(self, ids: Sequence[int], sem: Sequence[int]) -> KVState:
        """The cached state sharing the longest prefix with `ids`/`sem` (cut to it), or an empty one."""
        best, best_key, best_len = KVState(), None, 0
        for key, state in self.entries.items():
            n = state.shared_prefix(ids, sem)
            if n > best_len:
                best, best_key, best_len = state, key, n
        self.lookups += 1
        self.prompt_tokens += len(ids)
        if best_key is None:
            return KVState()
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.tokens_reused += min(best_len, len(ids) - 1)
        return best.cropped(best_len)

    def put(self, state: KVState) -> None:
        """Keeps `state`; entries it extends are dropped (it holds them); then the oldest go until within budget."""
        if not len(state) or state.nbytes > self.budget:
            return
        for key in [k for k, old in self.entries.items() if old.shared_prefix(state.ids, state.sem) == len(old)]:
            self.bytes -= self.entries.pop(key).nbytes
        self.entries[self._next] = state
        self._next += 1
        self.bytes += state.nbytes
        while self.bytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self.entries),
            "bytes": self.bytes,
            "budget_bytes": self.budget,
            "lookups": self.lookups,
            "hits": self.hits,
            "evictions": self.evictions,
            "prompt_tokens": self.prompt_tokens,
            "tokens_reused": self.tokens_reused,
            "hit_rate": self.tokens_reused / self.prompt_tokens if self.prompt_tokens else 0.0,
        }


@dataclass
class Job:
    """One request: a conversation, and the decoding options of each of its choices (`n` of them)."""

    messages: list[Mapping[str, Any]]
    options: list[DecodeOptions]
    tools: list[Any] | None = None
    typing: str | None = None
    cut: bool = False  # cut an over-long conversation as training does, instead of refusing it
    on_text: OnText | None = None
    future: Future = field(default_factory=Future)
    typed: list[dict[str, Any]] = field(default_factory=list)  # the messages as typed, for the response


@dataclass
class Call:
    """Work for the worker outside a batch (an encoding: the tokenizer stays on one thread)."""

    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)
    options: tuple = ()  # takes no room in a batch


@dataclass
class Answer:
    """What a job gets back: its choices' replies and the messages as they were typed."""

    replies: list[Reply]
    messages: list[dict[str, Any]]


class Engine:
    """The worker: batches of up to `max_batch` choices, a prefix cache of `cache_bytes`."""

    def __init__(self, agent: Agent, max_batch: int = 16, cache_bytes: int = 512 << 20):
        self.agent = agent
        self.max_batch = max_batch
        self.cache = PrefixCache(cache_bytes)
        self.jobs: queue.Queue[Job | Call | None] = queue.Queue()
        self.batches = 0
        self.largest_batch = 0
        self.requests = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._work, name="hsa-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future:
        self.jobs.put(job)
        return job.future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Runs `fn` on the worker, between batches (an encoding outside a batch); its result comes in the future."""
        call = Call(fn)
        self.jobs.put(call)
        return call.future

    def close(self) -> None:
        """Finishes the queued jobs, then stops the worker."""
        self.jobs.put(None)
        self._thread.join()

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failed": self.failed,
            "batches": self.batches,
            "largest_batch": self.largest_batch,
            "prefix_cache": self.cache.stats(),
        }

    # -- the worker ----------------------------------------------------------------------------------------------
    def _work(self) -> None:
        stop = False
        while not stop:
            first = self.jobs.get()
            if first is None:
                break
            batch, size = [first], len(first.options)
            while size < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
                size += len(job.options)
            self._run(batch)

    def _run(self, jobs: list[Job | Call]) -> None:
        ready: list[tuple[Job, list]] = []
        for job in jobs:
            if isinstance(job, Call):
                try:
                    job.future.set_result(job.fn())
                except Exception as exc:  # handed to the caller
                    job.future.set_exception(exc)
                continue
            self.requests += 1
            try:
                ready.append((job, self._sessions(job)))
            except Exception as exc:  # a ValueError is the request's fault (400); anything else its own 500
                self.failed += 1
                job.future.set_exception(exc)
        if not ready:
            return
        sessions = [s for _, choices in ready for s, _ in choices]
        prompts = [p for _, choices in ready for _, p in choices]
        options = [o for job, _ in ready for o in job.options]
        owners = [(job, k) for job, choices in ready for k in range(len(choices))]

        def on_text(i: int, text: str, finish: str | None) -> None:
            job, k = owners[i]
            if job.on_text is not None:
                job.on_text(k, text, finish)

        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(sessions))
        try:
            replies = self.agent.respond(sessions, options, on_text=on_text, prompts=prompts)
        except Exception as exc:  # a model failure fails the batch's requests, not the server
            log.exception("batch of %d replies failed", len(sessions))
            for job, _ in ready:
                self.failed += 1
                job.future.set_exception(RuntimeError(f"generation failed: {exc}"))
            return
        for session in sessions:
            self.cache.put(session.state)
        start = 0
        for job, choices in ready:
            job.future.set_result(Answer(replies[start : start + len(choices)], job.typed))
            start += len(choices)

    def _sessions(self, job: Job) -> list:
        """The job's choices as sessions with their prompts, each starting from the best cached prefix."""
        agent = self.agent
        reserve = max(o.max_new_tokens for o in job.options)
        session = agent.session(job.messages, job.tools, typing=job.typing)
        job.typed = [dict(m) for m in session.messages]
        prompt = agent.prompt(session, reserve, cut=job.cut)
        session.state = self.cache.lookup(prompt.ids, prompt.sem)
        return [(session if k == 0 else session.fork(), prompt) for k in range(len(job.options))]
