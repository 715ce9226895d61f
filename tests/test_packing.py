"""Packing (issue 9): best-fit decreasing against references and bounds, the packed collator's rows, and packing
invariance: a packed sample's logits (and loss) equal its own alone, through the training loop's forward path."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from hsa_train import enable_hsa
from hsa_train.data.collator import PackedCollator, SemanticCollator
from hsa_train.data.packing import efficiency, pack
from hsa_train.model.loading import enable_activation_checkpointing
from hsa_train.training.loss import next_token_targets, token_loss_sum, token_losses
from hsa_train.training.step import make_forward
from tests.conftest import tiny_model

CPU = torch.device("cpu")
LAMBDAS = {"GLOBAL_CONDITION": 0.0, "KEY_EVENT": 0.05, "PROCESS_NOISE": 0.1}


# -- references ---------------------------------------------------------------------------------------------------
def best_fit_reference(lengths, capacity):
    """Textbook BFD, O(n * rows): sort by (length desc, index), each into the row with the least room that fits
    (the oldest such row on ties), else a new row."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fitting = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fitting:
            r = min(fitting, key=lambda r: (free[r], r))
        else:
            r = len(rows)
            rows.append([])
            free.append(capacity)
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows


def first_fit(lengths, capacity):
    """First fit in arrival order (no sorting): each sample into the first row it fits in."""
    rows, free = [], []
    for i, n in enumerate(lengths):
        r = next((r for r in range(len(rows)) if free[r] >= n), None)
        if r is None:
            r = len(rows)
            rows.append([])
            free.append(capacity)
        rows[r].append(i)
        free[r] -= n
    return rows


def next_fit(lengths, capacity):
    """Concatenate in order, a new row when the next sample does not fit (a common naive packer)."""
    rows, free = [], 0
    for i, n in enumerate(lengths):
        if n > free:
            rows.append([])
            free = capacity
        rows[-1].append(i)
        free -= n
    return rows


def optimum(lengths, capacity):
    """The fewest rows, by exhaustive search (tiny instances only)."""
    items = sorted(lengths, reverse=True)
    best = [len(items)]

    def place(k, free):
        if len(free) >= best[0]:
            return
        if k == len(items):
            best[0] = len(free)
            return
        seen = set()
        for r, room in enumerate(free):
            if room >= items[k] and room not in seen:
                seen.add(room)
                free[r] -= items[k]
                place(k + 1, free)
                free[r] += items[k]
        free.append(capacity - items[k])
        place(k + 1, free)
        free.pop()

    place(0, [])
    return best[0]


def check_valid(rows, lengths, capacity):
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))  # every sample exactly once
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    assert all(row for row in rows)


def realistic_lengths(n, seed=0):
    """Log-normal sample lengths clipped to 50..2000 (median ~400): SFT conversations."""
    rng = np.random.default_rng(seed)
    return np.clip(np.exp(rng.normal(math.log(400), 0.8, n)), 50, 2000).astype(int).tolist()


# -- pack ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_pack_matches_the_reference_best_fit(seed):
    rnd = random.Random(seed)
    capacity = rnd.choice([16, 64, 100, 2048])
    lengths = [rnd.randint(1, capacity) for _ in range(rnd.randint(1, 300))]
    if seed % 2:  # many equal lengths: the tie rules decide
        lengths = [rnd.choice([capacity // 4, capacity // 3, capacity // 2 + 1]) or 1 for _ in lengths]
    rows = pack(lengths, capacity)
    check_valid(rows, lengths, capacity)
    assert rows == best_fit_reference(lengths, capacity)
    assert rows == pack(lengths, capacity)  # deterministic


def test_pack_ties_and_order():
    assert pack([3, 3, 3], 6) == [[0, 1], [2]]  # equal lengths in index order
    assert pack([5, 5, 1], 6) == [[0, 2], [1]]  # equal room: the older row
    assert pack([2, 5, 4], 6) == [[1], [2, 0]]  # best fit: 2 goes where 2 is left, not where 1 is
    assert pack([], 8) == []
    assert pack([8], 8) == [[0]]


def test_pack_rejects_samples_that_do_not_fit():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens > capacity 8; truncate"):
        pack([3, 9], 8)
    with pytest.raises(ValueError, match="sample 0 has 0 tokens"):
        pack([0, 3], 8)


@pytest.mark.parametrize("seed", range(40))
def test_pack_is_within_the_bfd_bound_of_the_optimum(seed):
    """BFD <= 11/9 OPT + 6/9, with OPT found exhaustively on small sets."""
    rnd = random.Random(seed)
    capacity = rnd.choice([10, 12, 20])
    lengths = [rnd.randint(1, capacity) for _ in range(rnd.randint(2, 9))]
    rows = pack(lengths, capacity)
    check_valid(rows, lengths, capacity)
    assert len(rows) <= 11 / 9 * optimum(lengths, capacity) + 6 / 9


@pytest.mark.parametrize("seed", range(5))
def test_pack_near_the_lower_bound_on_large_random_sets(seed):
    """On random sets BFD is within the worst-case bound even of the lower bound ceil(sum / capacity)."""
    rnd = random.Random(seed)
    capacity = 2048
    lengths = [rnd.randint(1, capacity) for _ in range(2000)] if seed < 2 else realistic_lengths(3000, seed)
    rows = pack(lengths, capacity)
    check_valid(rows, lengths, capacity)
    lower = math.ceil(sum(lengths) / capacity)
    assert lower <= len(rows) <= 11 / 9 * lower + 6 / 9


def test_packing_efficiency_on_realistic_lengths():
    """BFD against first fit, next fit and one sample per row on log-normal lengths 50..2000, rows of 2048."""
    capacity, lengths = 2048, realistic_lengths(5000)
    figures = {
        name: efficiency(lengths, rows, capacity)
        for name, rows in {
            "bfd": pack(lengths, capacity),
            "first_fit": first_fit(lengths, capacity),
            "next_fit": next_fit(lengths, capacity),
            "one_per_row": [[i] for i in range(len(lengths))],
        }.items()
    }
    figures["lower_bound"] = sum(lengths) / (math.ceil(sum(lengths) / capacity) * capacity)
    print("packing efficiency (non-pad / all tokens):", {k: round(v, 4) for k, v in figures.items()})
    assert figures["bfd"] >= figures["first_fit"] > figures["next_fit"] > figures["one_per_row"]
    assert figures["bfd"] > 0.99 and figures["one_per_row"] < 0.3


def test_pack_a_million_samples_quickly():
    import time

    lengths = realistic_lengths(1_000_000, seed=3)
    start = time.perf_counter()
    rows = pack(lengths, 2048)
    elapsed = time.perf_counter() - start
    assert sum(len(r) for r in rows) == len(lengths)
    assert efficiency(lengths, rows, 2048) > 0.99
    assert elapsed < 30, f"packing 1M samples took {elapsed:.1f}s"


# -- the packed collator ------------------------------------------------------------------------------------------
A = {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7], "semantic_ids": [0, 1, 1]}
B = {"input_ids": [8, 9], "attention_mask": [1, 1], "labels": [-100, 9], "semantic_ids": [2, 0]}
C = {"input_ids": [4], "attention_mask": [1], "labels": [4], "semantic_ids": [1]}


def test_packed_rows():
    batch = PackedCollator(pad_token_id=3, capacity=8)([[A, B], [C]])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 3, 3], [4, 3, 3, 3, 3, 3, 3, 3]]
    assert batch["labels"].tolist() == [
        [-100, 6, 7, -100, 9, -100, -100, -100],  # each document's first token is no target
        [-100] * 8,
    ]
    assert batch["semantic_ids"].tolist() == [[0, 1, 1, 2, 0, 2, 2, 2], [1, 2, 2, 2, 2, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_packed_rows_without_capacity_pad_to_a_multiple():
    batch = PackedCollator(pad_token_id=0, default_type_id=1, pad_to_multiple_of=4)([[A, B], [C, C]])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 0, 1, 2, 3, 4, 5]]
    assert batch["semantic_ids"][1].tolist() == [1, 1, 1, 1, 1, 1, 1, 1]
    full = PackedCollator(pad_token_id=0)([[A, B]])  # a full row: no padding document
    assert full["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_packed_collator_errors():
    with pytest.raises(ValueError, match="row 0 holds 5 tokens > capacity 4"):
        PackedCollator(pad_token_id=0, capacity=4)([[A, B]])
    with pytest.raises(ValueError, match="sample 1 has per-token fields of different lengths"):
        PackedCollator(pad_token_id=0)([[A, dict(B, labels=[1])]])
    with pytest.raises(ValueError, match="a row has no samples"):
        PackedCollator(pad_token_id=0)([[A], []])
    with pytest.raises(ValueError, match="no pad token"):
        PackedCollator(pad_token_id=None)


# -- packing invariance through the training forward path ---------------------------------------------------------
def random_samples(lengths, seed, vocab=64, labels="assistant"):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=gen).tolist()
        sem = torch.randint(0, 3, (n,), generator=gen).tolist()
        if labels == "all":
            lab = list(ids)
        else:  # a prompt, then trained tokens
            cut = max(1, n // 2)
            lab = [-100] * cut + ids[cut:]
        samples.append({"input_ids": ids, "attention_mask": [1] * n, "labels": lab, "semantic_ids": sem})
    return samples


def build(arch, mode):
    model = tiny_model(model_type=arch, seed=1)
    if mode == "stock-eager":
        model.set_attn_implementation("eager")
    elif mode.startswith("hsa-"):
        model = enable_hsa(model, lambdas=LAMBDAS, backend=mode[4:], head_scaling="alibi")
    return model, mode.startswith("hsa-")


def packed_batch(samples, capacity):
    rows = pack([len(s["input_ids"]) for s in samples], capacity)
    batch = PackedCollator(pad_token_id=0, capacity=capacity)([[samples[i] for i in row] for row in rows])
    where = {}  # sample -> (row, start)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            where[i] = (r, start)
            start += len(samples[i]["input_ids"])
    return batch, where, rows


MODES = ["stock-sdpa", "stock-eager", "hsa-eager", "hsa-sdpa"]
LENGTHS = [7, 5, 9, 3, 6, 4, 1]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_packed_logits_equal_alone(arch, mode):
    model, use_hsa = build(arch, mode)
    forward = make_forward(model, CPU, None, use_hsa)
    samples = random_samples(LENGTHS, seed=2)
    batch, where, rows = packed_batch(samples, capacity=16)
    assert any(len(row) > 1 for row in rows)
    unpacked = SemanticCollator(pad_token_id=0)
    with torch.no_grad():
        packed = forward(batch)
        for i, sample in enumerate(samples):
            alone = forward(unpacked([sample]))[0]
            r, start = where[i]
            torch.testing.assert_close(packed[r, start : start + len(alone)], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["stock-sdpa", "hsa-sdpa", "hsa-eager"])
def test_the_padding_tail_changes_no_document(mode):
    model, use_hsa = build("qwen2", mode)
    forward = make_forward(model, CPU, None, use_hsa)
    docs = random_samples([6, 4, 5], seed=3)
    with torch.no_grad():
        exact = forward(PackedCollator(pad_token_id=0)([docs]))  # 15 tokens, no padding
        padded = forward(PackedCollator(pad_token_id=0, capacity=24)([docs]))
    torch.testing.assert_close(padded[:, :15], exact, atol=1e-5, rtol=1e-5)


def per_sample_loss_sum(forward, samples, unpacked):
    return sum(token_loss_sum(forward(b), next_token_targets(b)) for b in (unpacked([s]) for s in samples))


@pytest.mark.parametrize("arch,mode", [("qwen2", "hsa-sdpa"), ("llama", "stock-sdpa"), ("qwen2", "hsa-eager")])
def test_packed_loss_and_gradients_equal_unpacked(arch, mode):
    """train_on=all style labels (every token a target): without the first-token rule the packed loss would hold
    cross-document targets. Loss sums and gradients match; gradient checkpointing changes neither."""
    model, use_hsa = build(arch, mode)
    model.train()
    forward = make_forward(model, CPU, None, use_hsa)
    samples = random_samples(LENGTHS, seed=4, labels="all")
    batch, _, _ = packed_batch(samples, capacity=16)
    unpacked = SemanticCollator(pad_token_id=0)
    n_targets = sum(len(s["input_ids"]) - 1 for s in samples)
    assert int((next_token_targets(batch) != -100).sum()) == n_targets

    def loss_and_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_loss, ref_grads = loss_and_grads(lambda: per_sample_loss_sum(forward, samples, unpacked))
    loss, grads = loss_and_grads(lambda: token_loss_sum(forward(batch), next_token_targets(batch)))
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)
    # per-token losses, too: each document's targets in place
    per_token = token_losses(forward(batch), next_token_targets(batch)).detach()
    assert per_token.sum().item() == pytest.approx(loss.item(), rel=1e-6)

    enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(lambda: token_loss_sum(forward(batch), next_token_targets(batch)))
    torch.testing.assert_close(ckpt_loss, ref_loss, atol=1e-4, rtol=1e-5)
    for g, ref in zip(ckpt_grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def test_make_forward_passes_position_ids_and_no_mask():
    """The packed path reaches the model with position_ids and attention_mask=None (transformers detects
    packed documents only then); an unpacked batch keeps its attention mask."""
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, **kwargs):
            seen.clear()
            seen.update(kwargs)
            return type("Out", (), {"logits": torch.zeros(1)})()

    forward = make_forward(Spy(), CPU, None, use_hsa=True)
    forward(PackedCollator(pad_token_id=0, capacity=8)([[A, B]]))
    assert set(seen) == {"input_ids", "position_ids", "semantic_ids", "use_cache"} and seen["use_cache"] is False
    forward(SemanticCollator(pad_token_id=0)([A, B]))
    assert set(seen) == {"input_ids", "attention_mask", "semantic_ids", "use_cache"}


def test_real_conversations_truncated_packed_and_fed_like_alone(tokenizer, small_data):
    """The demo trajectories (461..851 tokens) through the data path: SemanticTokenizer, truncation to 384 tokens,
    BFD rows of 768 (two cutoffs, so that rows hold several), the packed collator and the training forward (HSA
    sdpa, alibi); each conversation's logits in its row equal its logits alone."""
    import json

    from hsa_train.data import SemanticTokenizer
    from hsa_train.data.truncate import fit

    st, cutoff, capacity = SemanticTokenizer(tokenizer), 384, 768
    samples = []
    for line in small_data.read_text().splitlines()[:12]:
        enc, _ = fit(st.encode_detailed, json.loads(line)["messages"], None, cutoff)
        samples.append(enc.features)
    model = enable_hsa(tiny_model(vocab_size=len(tokenizer), seed=2), lambdas=LAMBDAS, head_scaling="alibi")
    forward = make_forward(model, CPU, None, use_hsa=True)
    rows = pack([len(s["input_ids"]) for s in samples], capacity)
    assert len(rows) < len(samples)
    collate = PackedCollator.from_tokenizer(st, capacity=capacity)
    alone = SemanticCollator.from_tokenizer(st)
    with torch.no_grad():
        packed = forward(collate([[samples[i] for i in row] for row in rows]))
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = len(samples[i]["input_ids"])
                ref = forward(alone([samples[i]]))[0]
                torch.testing.assert_close(packed[r, start : start + n], ref, atol=1e-5, rtol=1e-5)
                start += n
