"""build_support refuses impossible rollout data by name (issue #17, item 2), with one device read per call.

Cases are built by hand from explicit probabilities, so each test states the number it expects in the message.
"""

import math
import re

import pytest
import torch

from dppo_verl.ops.support import LOGP_TOL, MASS_TOL, build_support

V = 50


def _case(probs, sampled=None, sampled_p=None, ids=None):
    """One token: top-K log-probs from ``probs`` (ranks 1..K), ids 0..K-1 unless given; the sampled token is rank 1
    (inside the top-K) unless ``sampled_p`` puts it outside them (id K + 3)."""
    k = len(probs)
    logp = torch.tensor([[math.log(p) if p > 0 else float("-inf") for p in probs]], dtype=torch.float32)
    tids = torch.arange(k, dtype=torch.int32)[None] if ids is None else torch.tensor([ids], dtype=torch.int32)
    if sampled is None:
        sampled = tids[0, 0].item() if sampled_p is None else k + 3
    a = torch.tensor([sampled])
    mu_a = torch.tensor([math.log(sampled_p) if sampled_p is not None else float(logp[0, 0])], dtype=torch.float32)
    return a, mu_a, tids, logp


def _build(a, mu_a, tids, logp, **kw):
    return build_support(a, mu_a, tids, logp, vocab_size=V, **kw)


def test_topk_mass_past_one_is_refused_with_index_and_sum():
    a, mu_a, tids, logp = _case([0.6, 0.3, 0.15])  # 1.05
    a, mu_a, tids, logp = (torch.cat([x, x]) for x in (a, mu_a, tids, logp))
    logp[0] = torch.log(torch.tensor([0.5, 0.3, 0.1]))  # row 0 fine (0.9), row 1 bad
    with pytest.raises(ValueError, match=r"rollout_topk_logprobs \(shape \[2, 3\]\): the probabilities at index "
                                         r"\[1\] sum to 1\.05 > 1 \+ 0\.001"):
        _build(a, mu_a, tids, logp)


def test_mass_tolerance_both_sides():
    _build(*_case([0.5, 0.3, 0.2 + 0.5 * MASS_TOL]))  # 1.0005: rounding upstream, accepted
    with pytest.raises(ValueError, match=r"sum to 1\.002 "):
        _build(*_case([0.5, 0.3, 0.2 + 2 * MASS_TOL]))


def test_sampled_token_outside_topk_counts_toward_the_mass():
    _build(*_case([0.5, 0.3, 0.1], sampled_p=0.1))  # exactly 1 with a_t: fine
    with pytest.raises(ValueError, match=r"sum to 1\.1 .*ranks 0\.9 plus rollout_log_probs of the sampled token "
                                         r"outside the top-K \(0\.2\)"):
        _build(*_case([0.5, 0.3, 0.1], sampled_p=0.2))
    # a_t inside the top-K: its rollout_log_probs does not count twice
    _build(*_case([0.5, 0.3, 0.2], sampled=1, sampled_p=0.3))


def test_duplicates_and_padding_do_not_count():
    _build(*_case([0.6, 0.3, 0.6], ids=[4, 5, 4]))  # rank 3 repeats rank 1: mass 0.9
    _build(*_case([0.6, 0.3, 0.0, 0.0]))  # -inf padded ranks (fewer than K candidates)


def test_duplicate_ranks_match_a_first_occurrence_loop():
    """The sort-based duplicate flags against the obvious loop: a rank is a duplicate when its id occurred at a lower
    real rank; triples, gaps of padded ranks, padded ranks sharing an id, every row of a [2, 3, K] batch."""
    from dppo_verl.ops.support import _duplicate_ranks

    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 5, 20):
        ids = torch.randint(0, 4, (2, 3, k), generator=g)  # 4 ids over up to 20 ranks: many repeats
        real = torch.rand(2, 3, k, generator=g) > 0.3
        want = torch.zeros_like(real)
        for row in range(6):
            seen = set()
            for j in range(k):
                i = ids.view(6, k)[row, j].item()
                want.view(6, k)[row, j] = i in seen
                if real.view(6, k)[row, j]:
                    seen.add(i)
        got = _duplicate_ranks(ids, real)
        assert torch.equal(got & real, want & real), (k, ids, real)


def test_positive_logprobs_are_refused_by_key():
    a, mu_a, tids, logp = _case([0.5, 0.3, 0.1])
    logp[0, 2] = 0.01
    with pytest.raises(ValueError, match=r"rollout_topk_logprobs \(shape \[1, 3\]\) has a log-probability above "
                                         r"0\.0001 \(p > 1\) at index \[0, 2\]: 0\.0099999"):
        _build(a, mu_a, tids, logp)
    a, mu_a, tids, logp = _case([1.0, 0.0, 0.0])
    logp[0, 0] = mu_a[0] = 0.5 * LOGP_TOL  # fp32 rounding of a peaked log-softmax: accepted
    _build(a, mu_a, tids, logp)
    for topk in (True, False):
        a, mu_a, tids, logp = _case([0.5, 0.3, 0.1])
        mu_a[0] = 0.25
        with pytest.raises(ValueError, match=r"^rollout_log_probs \(shape \[1\]\) has a log-probability above .* "
                                             r"at index \[0\]: 0\.25"):
            build_support(a, mu_a, tids if topk else None, logp if topk else None)


def test_raw_logits_passed_as_logprobs_are_refused():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=g) * 3.0
    top, ids = logits.topk(5, dim=-1)
    a = ids[:, 0]
    with pytest.raises(ValueError, match=r"rollout_log_probs .* above 0\.0001"):  # the sampled token's first
        build_support(a, top[:, 0], ids, top, vocab_size=V)
    with pytest.raises(ValueError, match=r"rollout_topk_logprobs .* above 0\.0001"):
        build_support(a, torch.full((6,), -1.0), ids, top, vocab_size=V)
    # logits that happen to be all negative still do not sum to one
    shifted = top - top[:, :1] - 0.01
    with pytest.raises(ValueError, match=r"rollout_topk_logprobs .*sum to \d"):
        build_support(a, shifted[:, 0], ids, shifted, vocab_size=V)
    # the same values log-softmax-normalised are accepted
    lq = torch.log_softmax(logits, -1)
    top_lq = lq.gather(-1, ids)
    build_support(a, top_lq[:, 0], ids, top_lq, vocab_size=V)


def test_nan_and_posinf_still_refused_and_padded_rows_ignored():
    a, mu_a, tids, logp = _case([0.5, 0.3, 0.1])
    a, mu_a, tids, logp = (torch.cat([x, x]) for x in (a, mu_a, tids, logp))
    logp[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"rollout_topk_logprobs \(shape \[2, 3\]\) has NaN/\+inf .* \[1, 1\]: inf"):
        _build(a, mu_a, tids, logp)
    mu_a[0] = float("nan")
    with pytest.raises(ValueError, match=r"^rollout_log_probs .*NaN/\+inf.* \[0\]: nan"):
        _build(a, mu_a, tids, logp)
    # padded rows (response_mask 0) hold garbage and are never validated: mass, sign, NaN, ids
    logp[1] = torch.tensor([5.0, float("nan"), 3.0])
    tids[1, 0] = V + 100
    mu_a[1] = float("nan")
    mu_a[0] = math.log(0.05)
    sup = _build(a, mu_a, tids, logp, row_valid=torch.tensor([True, False]))
    assert not bool(sup.valid[1].any())


def test_nan_is_named_before_p_above_one_wherever_it_sits():
    """NaN/+inf and p > 1 ride in one flag per tensor; the message keeps their precedence (NaN/+inf first, at its own
    index) even when a p > 1 value comes earlier in the tensor."""
    a, mu_a, tids, logp = _case([0.5, 0.3, 0.1])
    a, mu_a, tids, logp = (torch.cat([x, x]) for x in (a, mu_a, tids, logp))
    logp[0, 2] = 0.5  # p > 1 first
    logp[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"^rollout_topk_logprobs \(shape \[2, 3\]\) has NaN/\+inf .*index \[1, 2\]: nan"):
        _build(a, mu_a, tids, logp)
    logp[1, 2] = math.log(0.1)
    with pytest.raises(ValueError, match=r"^rollout_topk_logprobs .* above 0\.0001 \(p > 1\) at index \[0, 2\]: 0\.5"):
        _build(a, mu_a, tids, logp)


def test_id_range_is_checked_in_the_same_pass():
    a, mu_a, tids, logp = _case([0.5, 0.3, 0.1])
    tids[0, 1] = V
    with pytest.raises(ValueError, match=rf"rollout_topk_ids \(shape \[1, 3\]\) has ids outside \[0, {V}\): {V} at "
                                         r"index \[0, 1\]"):
        _build(a, mu_a, tids, logp)
    with pytest.raises(ValueError, match=rf"response ids .* outside \[0, {V}\): -1"):
        _build(torch.tensor([-1]), *_case([0.5])[1:])


_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy")


@pytest.mark.parametrize("topk", [True, False])
def test_one_device_read_on_the_happy_path(monkeypatch, topk):
    """Every way to read a tensor to the host is counted while build_support runs on valid data."""
    g = torch.Generator().manual_seed(1)
    lq = torch.log_softmax(torch.randn(64, V, generator=g), -1)
    top_lq, ids = lq.topk(8, dim=-1)
    a = torch.randint(0, V, (64,), generator=g)
    mu = lq.gather(-1, a[:, None])[:, 0]
    rows = torch.rand(64, generator=g) > 0.2
    calls = []
    for name in _READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)
    if topk:
        build_support(a, mu, ids.int(), top_lq, vocab_size=V, num_topk=8, row_valid=rows)
    else:
        build_support(a, mu, vocab_size=V, row_valid=rows)
    monkeypatch.undo()
    assert calls == ["tolist"], calls
