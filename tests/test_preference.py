"""Preference losses against references written here: log-probs summed token by token in plain Python, DPO's and
IPO's losses and gradients in closed form, and TRL's formula (DPOTrainer.dpo_loss) on the same numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_pairs import AGENT_PAIR

from hsa_train.training.preference import PreferenceLoss, preference_loss, sequence_logps
from hsa_train.types import IGNORE_INDEX


def test_sequence_logps_match_a_token_by_token_sum():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[0, :4] = IGNORE_INDEX
    labels[1, :] = IGNORE_INDEX  # nothing trained
    labels[2, 2] = IGNORE_INDEX  # a hole in the middle
    sums, counts = sequence_logps(logits, labels)
    for row in range(3):
        total, n = 0.0, 0
        for t in range(1, 7):  # label t is predicted by the logits at t - 1
            y = int(labels[row, t])
            if y == IGNORE_INDEX:
                continue
            z = [float(v) for v in logits[row, t - 1]]
            top = max(z)
            total += z[y] - (top + math.log(sum(math.exp(v - top) for v in z)))
            n += 1
        assert sums[row].item() == pytest.approx(total, abs=1e-5)
        assert int(counts[row]) == n
    assert counts.tolist() == [3, 0, 5]


def trl_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing, loss_type):
    """TRL's DPOTrainer.dpo_loss for loss_type sigmoid and ipo, as TRL writes it."""
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


@pytest.mark.parametrize("loss,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.1, 0.0)])
def test_loss_rewards_and_gradients(loss, beta, smoothing):
    gen = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(5, generator=gen, dtype=torch.float64) * 3 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    terms = preference_loss(pc, pr, rc, rr, beta, smoothing, loss)
    ref_losses, ref_chosen, ref_rejected = trl_dpo_loss(pc, pr, rc, rr, beta, smoothing, loss)
    torch.testing.assert_close(terms.losses, ref_losses)
    torch.testing.assert_close(terms.chosen_rewards, ref_chosen)
    torch.testing.assert_close(terms.rejected_rewards, ref_rejected)
    terms.losses.sum().backward()
    h = ((pc - pr) - (rc - rr)).detach()
    if loss == "sigmoid":  # d/dh of -(1-ε) log σ(βh) - ε log σ(-βh)
        dh = -beta * (1 - smoothing) * torch.sigmoid(-beta * h) + beta * smoothing * torch.sigmoid(beta * h)
    else:
        dh = 2 * (h - 1 / (2 * beta))
    torch.testing.assert_close(pc.grad, dh)
    torch.testing.assert_close(pr.grad, -dh)


def test_known_values_and_bad_loss():
    zero = torch.zeros(1)
    assert preference_loss(zero, zero, zero, zero, 0.1).losses.item() == pytest.approx(math.log(2))
    one = torch.ones(1)  # the policy prefers the chosen side by 1 nat more than the reference
    assert preference_loss(one, zero, zero, zero, 2.0).losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))))
    assert preference_loss(one, zero, zero, zero, 0.25, loss="ipo").losses.item() == pytest.approx((1 - 2) ** 2)
    with pytest.raises(ValueError, match="stage.loss='hinge' is not allowed; use one of: sigmoid, ipo"):
        preference_loss(zero, zero, zero, zero, 0.1, loss="hinge")
    with pytest.raises(ValueError, match="stage.loss='hinge' is not allowed; use one of: sigmoid, ipo"):
        PreferenceLoss(lambda batch: None, 0.1, loss="hinge")


# -- the objective on a real model: batched and split against pair-by-pair forwards written here -----------------
PAIRS = [  # (prompt, chosen, rejected): an agent's multi-turn continuation against one step, and a plain reply
    (AGENT_PAIR["messages"], AGENT_PAIR["chosen"], [AGENT_PAIR["rejected"]]),
    (
        [{"role": "user", "content": "Task: say hello."}],
        [{"role": "assistant", "content": "Hello there, friend."}],
        [{"role": "assistant", "content": "Goodbye."}],
    ),
]


def encoded_pairs(tokenizer):
    from hsa_train.data import SemanticTokenizer
    from hsa_train.data.pairs import encode_pair

    st = SemanticTokenizer(tokenizer)
    out = []
    for prompt, chosen, rejected in PAIRS:
        (c, r), _, _ = encode_pair(st.encode_detailed, prompt + chosen, prompt + rejected, len(prompt), None, None, {})
        out.append((c.features, r.features))
    return out


def row_logp(model, features) -> torch.Tensor:
    """Summed log p of a sample's trained tokens, the sample alone (no padding), token by token."""
    ids, sem = (torch.tensor(features[k])[None] for k in ("input_ids", "semantic_ids"))
    logits = model(input_ids=ids, semantic_ids=sem).logits[0].float()
    total = torch.zeros(())
    for t, label in enumerate(features["labels"]):
        if t > 0 and label != IGNORE_INDEX:
            total = total + torch.log_softmax(logits[t - 1], -1)[label]
    return total


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_the_dpo_step_matches_pair_by_pair_forwards(tokenizer, model_factory, clone, loss):
    from hsa_train import enable_hsa
    from hsa_train.data import SemanticCollator
    from hsa_train.training.preference import frozen_copy
    from hsa_train.training.step import accumulate_gradients, make_forward

    pairs = encoded_pairs(tokenizer)
    base = enable_hsa(model_factory(vocab_size=len(tokenizer)), lambdas={"PROCESS_NOISE": 0.2})
    reference_model = clone(base).eval()
    policy = clone(base)
    with torch.no_grad():  # the policy has moved away from the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    beta, smoothing = 0.3, 0.1 if loss == "sigmoid" else 0.0
    cpu = torch.device("cpu")
    objective = PreferenceLoss(frozen_copy(make_forward(reference_model, cpu, None, True)), beta, smoothing, loss)
    collate = SemanticCollator(pad_token_id=0)
    results = []
    for groups in ([[0, 1]], [[0], [1]]):
        model = clone(policy)
        batches = [collate([pairs[i][0] for i in g] + [pairs[i][1] for i in g]) for g in groups]
        for batch, g in zip(batches, groups):
            batch["pairs"] = torch.tensor(len(g))  # as dataset.pair_batch marks them
        value, _, stats = accumulate_gradients(make_forward(model, cpu, None, True), batches, 2, objective=objective)
        results.append((value, stats, [p.grad.clone() for p in model.parameters()]))
    # the reference computation: each side alone, TRL's formula, the mean over the two pairs
    model = clone(policy)
    losses, margins = [], []
    for chosen, rejected in pairs:
        pc, pr = row_logp(model, chosen), row_logp(model, rejected)
        with torch.no_grad():
            rc, rr = row_logp(reference_model, chosen), row_logp(reference_model, rejected)
        if loss == "ipo":
            nc = sum(x != IGNORE_INDEX for x in chosen["labels"][1:])
            nr = sum(x != IGNORE_INDEX for x in rejected["labels"][1:])
            pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
        loss_k, chosen_reward, rejected_reward = trl_dpo_loss(pc, pr, rc, rr, beta, smoothing, loss)
        losses.append(loss_k)
        margins.append(float(chosen_reward - rejected_reward))
    total = torch.stack(losses).mean()
    total.backward()
    for value, stats, grads in results:
        assert value == pytest.approx(total.item(), rel=1e-5)
        assert stats[3] == pytest.approx(sum(margins), rel=1e-4, abs=1e-6)  # rewards/margin, summed over pairs
        assert stats[2] == sum(m > 0 for m in margins)  # rewards/accuracy
        for g, ref in zip(grads, (p.grad for p in model.parameters())):
            torch.testing.assert_close(g, ref, atol=2e-6, rtol=1e-4)


def test_the_lora_reference_is_the_starting_model_with_its_starting_lambdas(tokenizer, model_factory, clone):
    from types import SimpleNamespace

    from hsa_train import enable_hsa
    from hsa_train.data import SemanticCollator
    from hsa_train.model.lora import apply_lora
    from hsa_train.training.preference import adapters_off, sequence_logps
    from hsa_train.training.step import make_forward

    pairs = encoded_pairs(tokenizer)
    base = enable_hsa(model_factory(vocab_size=len(tokenizer)), lambdas={"PROCESS_NOISE": 0.2}, learnable=True)
    start = clone(base).eval()
    settings = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    model = apply_lora(clone(base), settings, train_lambdas=True)
    cpu = torch.device("cpu")
    forward = make_forward(model, cpu, None, True)
    reference = adapters_off(model, forward)
    with torch.no_grad():  # training moved the adapters and λ
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p).abs())
    batch = SemanticCollator(pad_token_id=0)([pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]])
    with torch.no_grad():
        ref = reference(batch)
        expected = sequence_logps(make_forward(start, cpu, None, True)(batch), batch["labels"])[0]
        moved = sequence_logps(forward(batch), batch["labels"])[0]
    torch.testing.assert_close(ref, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(moved, expected, atol=1e-3)  # the policy itself did move
    lambdas = next(p for n, p in model.named_parameters() if n.endswith("hsa.raw"))
    assert lambdas.detach().min() > 0.04  # and its λ are back where training left them


def test_filler_rows_and_filler_batches_add_nothing_to_the_eval_sums(tokenizer, model_factory, clone):
    """A collator may put a filler row after a batch's pairs, and a rank with fewer eval pairs runs batches that
    hold none: the sums are those of the pairs alone, and both models still ran (ranks step together)."""
    from hsa_train import enable_hsa
    from hsa_train.data import SemanticCollator
    from hsa_train.data.dataset import filler_batch
    from hsa_train.training.preference import frozen_copy, preference_eval_sums, summarize_preference
    from hsa_train.training.step import make_forward

    pairs = encoded_pairs(tokenizer)
    base = enable_hsa(model_factory(vocab_size=len(tokenizer)), lambdas={"PROCESS_NOISE": 0.2})
    reference_model, policy = clone(base).eval(), clone(base).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cpu = torch.device("cpu")
    calls = []

    def counted(forward):
        return lambda batch: calls.append(1) or forward(batch)

    objective = PreferenceLoss(frozen_copy(counted(make_forward(reference_model, cpu, None, True))), 0.2)
    forward = make_forward(policy, cpu, None, True)
    collate = SemanticCollator(pad_token_id=0)
    rows = [pairs[0][0], pairs[1][0], pairs[0][1], pairs[1][1]]
    plain = collate(rows)
    padded = collate(rows + [{k: v[:3] for k, v in pairs[0][0].items()}])  # a fifth row after the pairs
    for batch in (plain, padded):
        batch["pairs"] = torch.tensor(2)
    alone = preference_eval_sums(objective, forward, [plain])
    calls.clear()
    with_fillers = preference_eval_sums(objective, forward, [padded, filler_batch(collate)])
    assert len(calls) == 2  # the reference ran on the filler batch too
    assert with_fillers == pytest.approx(alone, rel=1e-6, abs=1e-7)
    summary = summarize_preference(with_fillers)
    assert summary["pairs"] == 2 and summary["loss"] == pytest.approx(alone[0] / 2)
    assert set(summary["rewards"]) == {"chosen", "rejected", "accuracy", "margin"}
    assert summary["rewards"]["margin"] == pytest.approx(summary["rewards"]["chosen"] - summary["rewards"]["rejected"])
