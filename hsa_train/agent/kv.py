"""Sessions' KV caches, kept between turns and batched for decoding.

A session's `KVState` is the tokens it has fed the model, their types, and each layer's keys and values for them.
A new turn's prompt shares a prefix with it (the same tokens with the same types): that prefix's keys and values
are exactly what a full recompute would produce (attention is causal, and the bias of a key depends only on its
type and its distance), so only the rest is fed. States are never changed in place: a cut is a slice, an extension
a new tensor, so a server's prefix cache can hand one state to many requests.

`Batch` runs several sessions in one forward: each row left-padded to the longest, cached keys padded the same way
(the bias counts raw index differences, which left padding leaves unchanged for every allowed pair), positions
counted per row. The batch's cache has room for the tokens its decoding steps add (`RoomyLayer`), so a step writes
its keys in place instead of copying the whole cache: what a step costs then grows only with the attention itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hsa_train.model.compat import cache_argument, cache_of, cache_tensors, output_cache, roomy_cache, with_room

Layers = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class KVState:
    """What one session has fed the model: token ids, type ids, and per layer (keys, values) of shape
    (1, heads, tokens, head_dim); `layers` is empty when nothing is cached."""

    ids: tuple[int, ...] = ()
    sem: tuple[int, ...] = ()
    layers: Layers = ()

    def __len__(self) -> int:
        return len(self.ids) if self.layers else 0

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def shared_prefix(self, ids: Sequence[int], sem: Sequence[int]) -> int:
        """How many leading tokens `ids`/`sem` share with this state (tokens and types both)."""
        n = 0
        for a, b, s, t in zip(self.ids[: len(self)], ids, self.sem, sem):
            if a != b or s != t:
                break
            n += 1
        return n

    def cropped(self, n: int) -> KVState:
        """The first `n` tokens (views: nothing is copied)."""
        n = max(0, min(n, len(self)))
        if n == 0:
            return KVState()
        return KVState(self.ids[:n], self.sem[:n], tuple((k[:, :, :n], v[:, :, :n]) for k, v in self.layers))


class Batch:
    """One forward over several sequences, each with a state it reuses as far as they agree; then decoding steps
    on the batched cache. `logits` (B, V) are each row's next-token logits after every call."""

    def __init__(
        self,
        model: nn.Module,
        sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
        states: Sequence[KVState],
        pad_id: int,
        pad_type: int,
        hsa: bool = True,
        cache_name: str | None = None,
        room: int = 0,
    ):
        """`room`: the tokens the decoding steps will feed after this forward (a reply's max_new_tokens - 1)."""
        self.model, self.hsa = model, hsa
        self.cache_name = cache_name or cache_argument(model)
        self.last_logits_only = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.device = next(model.parameters()).device
        lengths = [len(ids) for ids, _ in sequences]
        # what each row's state could give (it must feed one token at least, for its logits)
        self.shared = [min(state.shared_prefix(*seq), n - 1) for state, seq, n in zip(states, sequences, lengths)]
        q = max(n - r for n, r in zip(lengths, self.shared))  # queries per row this forward
        width = max(lengths)
        self.pads = [width - n for n in lengths]
        self.reused = [max(0, n - q) for n in lengths]  # tokens each row takes from its state (<= shared)
        self.fed = [n - r for n, r in zip(lengths, self.reused)]  # tokens each row feeds (pads not counted)
        self.ids = [list(ids) for ids, _ in sequences]
        self.sem_rows = [list(sem) for _, sem in sequences]
        past = width - q
        layers = [state.cropped(r).layers for state, r in zip(states, self.reused)]
        if past:
            cache = roomy_cache(_left_padded(layers, past, q + room), past)
        else:
            cache = cache_of([])
        rows = [[pad_id] * p + list(ids) for (ids, _), p in zip(sequences, self.pads)]
        sem_rows = [[pad_type] * p + list(sem) for (_, sem), p in zip(sequences, self.pads)]
        self.mask = torch.tensor([[0] * p + [1] * n for p, n in zip(self.pads, lengths)], device=self.device)
        self.sem = torch.tensor(sem_rows, device=self.device)
        positions = torch.tensor([[max(j - p, 0) for j in range(past, width)] for p in self.pads], device=self.device)
        input_ids = torch.tensor([row[past:] for row in rows], device=self.device)
        self._forward(input_ids, positions, cache)
        if not past:  # the forward filled a plain cache: one copy now, none per decoded token
            self.cache = with_room(self.cache, room)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> None:
        kwargs = {"semantic_ids": self.sem} if self.hsa else {}
        kwargs[self.cache_name] = cache
        if self.last_logits_only:
            kwargs["logits_to_keep"] = 1  # a prefill's other positions need no logits
        out = self.model(
            input_ids=input_ids, attention_mask=self.mask, position_ids=positions, use_cache=True, **kwargs
        )
        self.cache = output_cache(out)
        self.logits = out.logits[:, -1].float()

    def step(self, tokens: Sequence[int], type_id: int) -> None:
        """Feeds one token per row (typed `type_id`): the logits become those after it."""
        b = len(tokens)
        for row, tok in zip(self.ids, tokens):
            row.append(tok)
        for row in self.sem_rows:
            row.append(type_id)
        positions = torch.tensor([[len(row) - 1] for row in self.ids], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(b, 1)], dim=1)
        self.sem = torch.cat([self.sem, self.sem.new_full((b, 1), type_id)], dim=1)
        self._forward(torch.tensor([[t] for t in tokens], device=self.device), positions, self.cache)

    def state(self, row: int) -> KVState:
        """Row `row`'s state as it stands: every token it has fed, copied out of the batch."""
        tensors = cache_tensors(self.cache)
        if tensors is None:
            return KVState()
        pad = self.pads[row]
        layers = tuple((k[row : row + 1, :, pad:].clone(), v[row : row + 1, :, pad:].clone()) for k, v in tensors)
        return KVState(tuple(self.ids[row]), tuple(self.sem_rows[row]), layers)

    def keep(self, rows: Sequence[int]) -> None:
        """Drops every row but `rows` (finished sessions leave the batch), in that order."""
        index = torch.tensor(list(rows), device=self.device, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.mask, self.sem, self.logits = self.mask[index], self.sem[index], self.logits[index]
        self.pads = [self.pads[i] for i in rows]
        self.ids = [self.ids[i] for i in rows]
        self.sem_rows = [self.sem_rows[i] for i in rows]


def _left_padded(layers: Sequence[Layers], past: int, room: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (keys, values) buffers of `past` + `room` tokens: each row's state at the end of its first `past`
    (left-padded with zeros: masked anyway, and finite, as a masked NaN would still poison the weighted sum), the
    `room` after them unset."""
    template = next(state for state in layers if state)
    out = []
    for depth, (k0, v0) in enumerate(template):
        buffers = []
        for which, t in enumerate((k0, v0)):
            buffer = t.new_empty(len(layers), t.shape[1], past + room, t.shape[-1])
            for row, state in enumerate(layers):
                n = state[depth][which].shape[2] if state else 0
                buffer[row, :, : past - n] = 0
                if n:
                    buffer[row, :, past - n : past] = state[depth][which][0]
            buffers.append(buffer)
        out.append((buffers[0], buffers[1]))
    return out
