"""Preference losses against references written here: log-probs summed token by token in plain Python, DPO's and
IPO's losses and gradients in closed form, and TRL's formula (DPOTrainer.dpo_loss) on the same numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hsa_train.training.preference import preference_loss, sequence_logps
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
    with pytest.raises(ValueError, match="dpo.loss='hinge': choose one of sigmoid, ipo"):
        preference_loss(zero, zero, zero, zero, 0.1, loss="hinge")
