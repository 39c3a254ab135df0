"""Eq. 12 truth table: every sign x direction x threshold cell, for both thresholds."""

import itertools

import pytest
import torch

import reference as ref
from dppo_verl.ops.mask import trust_region_mask

DELTA_LOW, DELTA_HIGH = 0.1, 0.2  # distinct, so a swapped threshold shows up
DIVS = [0.05, 0.1, 0.15, 0.2, 0.25]  # below both, == low, between, == high, above both
ADVS = [1.0, 0.0, -1.0]
DIRS = [(-0.5, -0.7), (-0.6, -0.6), (-0.7, -0.5)]  # (log pi_t, log mu_t): pi > mu, pi == mu, pi < mu


def test_truth_table():
    cells = list(itertools.product(DIVS, ADVS, DIRS))
    div = torch.tensor([c[0] for c in cells])
    adv = torch.tensor([c[1] for c in cells])
    lp = torch.tensor([c[2][0] for c in cells])
    mu = torch.tensor([c[2][1] for c in cells])
    got = trust_region_mask(div, lp, mu, adv, delta_low=DELTA_LOW, delta_high=DELTA_HIGH)
    want = [ref.dppo_keep_mask(d, torch.tensor(l).exp().item(), torch.tensor(m).exp().item(), a, DELTA_LOW, DELTA_HIGH)
            for d, a, (l, m) in cells]
    assert got.tolist() == want
    # the rule's content, not just agreement: exactly these cells are dropped
    dropped = {(d, a, dr) for (d, a, dr), k in zip(cells, got.tolist()) if not k}
    assert dropped == {(0.25, 1.0, DIRS[0])} | {(d, -1.0, DIRS[2]) for d in (0.15, 0.2, 0.25)}


def test_push_overrides_direction():
    div = torch.tensor([0.3, 0.3, 0.3, 0.3])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    lp = torch.tensor([-0.1, -0.1, -0.1, -0.1])
    mu = torch.tensor([-0.2, -0.2, -0.2, -0.2])  # pi > mu everywhere
    push = torch.tensor([1.0, -1.0, -1.0, 1.0])
    got = trust_region_mask(div, lp, mu, adv, delta_low=0.1, delta_high=0.1, push=push)
    assert got.tolist() == [False, True, False, True]


def test_broadcast_shapes():
    div = torch.full((2, 3), 0.5)
    out = trust_region_mask(div, torch.zeros(2, 3), torch.full((2, 3), -1.0), torch.ones(2, 1), delta_low=0.1, delta_high=0.1)
    assert out.shape == (2, 3) and out.dtype == torch.bool and not bool(out.any())
