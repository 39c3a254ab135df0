"""A verl-V1-shaped micro-batch with rollout top-K tensors, and the fp64 truth to check the hook against.

Layout (verl 0.9.1 V1 trainer, "no padding"): nested ``input_ids [B, S_i]`` (prompt + response),
``prompts [B, P_i]``, ``responses [B, R_i]``, ``response_mask [B, R_i]``, ``rollout_log_probs [B, R_i]``,
``rollout_topk_ids [B, R_i, K]`` (int32), ``rollout_topk_logprobs [B, R_i, K]`` (fp32).
"""

from __future__ import annotations

import torch

import reference as ref


def nested(rows):
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def make_topk_batch(prompt_lens, resp_lens, vocab, k, *, seed=0, spread=0.5, pi_logits=None, nested_layout=True):
    """Returns ``(data, truth)``. ``pi_logits [N_total, V]`` fp64 (random unless given) are the trainer's
    logits on the packed rows; ``truth['div'][name] [B, R]`` the fp64 partition divergences per response
    token (0 where response_mask is 0), ``truth['ddot'][name] [B, R]`` the predictive rate (fp64 autograd,
    ``reference.predictive_ddot_autograd``) and ``truth['support_size'] [B, R]``."""
    from tensordict import TensorDict

    assert len(prompt_lens) == len(resp_lens) and min(prompt_lens) >= 1, (prompt_lens, resp_lens)  # row P-1 must exist
    g = torch.Generator().manual_seed(seed)
    seq = [p + r for p, r in zip(prompt_lens, resp_lens)]
    n = sum(seq)
    if pi_logits is None:
        pi_logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2.0
    offsets = [0]
    for s in seq:
        offsets.append(offsets[-1] + s)
    input_ids, prompts, responses, masks, rlp, tids, tlp = [], [], [], [], [], [], []
    b_count, r_max = len(seq), max(resp_lens)
    div = {"tv": torch.zeros(b_count, r_max, dtype=torch.float64), "kl": torch.zeros(b_count, r_max, dtype=torch.float64)}
    ddot = {name: torch.zeros(b_count, r_max, dtype=torch.float64) for name in div}
    size = torch.zeros(b_count, r_max)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        prompt = torch.randint(0, vocab, (p,), generator=g)
        rows = torch.arange(offsets[b] + p - 1, offsets[b] + p - 1 + r)  # rows that predict the response
        lq = ref.full_logprobs(pi_logits[rows] + spread * torch.randn(r, vocab, generator=g, dtype=torch.float64))
        top_lq, top_ids = lq.topk(k, dim=-1)
        resp = torch.multinomial(lq.exp(), 1, generator=g)[:, 0]
        if r > 1:  # force one sampled token outside the top-K, and one duplicate-free check inside
            resp[1] = torch.argsort(lq[1], descending=True)[k + 3]
        mask = torch.ones(r, dtype=torch.long)
        if r > 2:
            mask[2] = 0  # e.g. a tool / observation token inside the response
        lp = ref.full_logprobs(pi_logits[rows])
        for j in range(r):
            support = top_ids[j].tolist() + [int(resp[j])]
            if mask[j]:
                for name in div:
                    div[name][b, j] = ref.PARTITION[name](lp[j].exp(), lq[j].exp(), support)
                distinct = list(dict.fromkeys(support))
                mu_s = lq[j].exp()[distinct]
                mu_cells = torch.cat([mu_s, (1 - mu_s.sum()).clamp_min(0).reshape(1)])
                for name in ddot:
                    ddot[name][b, j] = ref.predictive_ddot_autograd(name, pi_logits[rows[j]], mu_cells, distinct,
                                                                    int(resp[j]))
                size[b, j] = len(distinct)
        input_ids.append(torch.cat([prompt, resp]))
        prompts.append(prompt)
        responses.append(resp)
        masks.append(mask)
        rlp.append(lq.gather(-1, resp[:, None])[:, 0].float())
        tids.append(top_ids.int())
        tlp.append(top_lq.float())
    td = dict(
        input_ids=nested(input_ids), prompts=nested(prompts), responses=nested(responses), response_mask=nested(masks),
        rollout_log_probs=nested(rlp), rollout_topk_ids=nested(tids), rollout_topk_logprobs=nested(tlp),
    )
    if not nested_layout:  # legacy trainer: right-padded response tensors + attention_mask
        td = _dense(td, prompt_lens, resp_lens)
    data = TensorDict(td, batch_size=[b_count])
    return data, dict(div=div, ddot=ddot, support_size=size, pi_logits=pi_logits, offsets=offsets)


def _dense(td, prompt_lens, resp_lens):
    b, p_max, r_max = len(prompt_lens), max(prompt_lens), max(resp_lens)

    def pad(x, width, value=0, left=False):
        out = torch.full((b, width) + tuple(x[0].shape[1:]), value, dtype=x[0].dtype)
        for i, row in enumerate(x.unbind()):
            if left:
                out[i, width - row.shape[0] :] = row
            else:
                out[i, : row.shape[0]] = row
        return out

    attn = torch.zeros(b, p_max + r_max, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        attn[i, p_max - p : p_max + r] = 1
    return dict(
        input_ids=td["input_ids"], prompts=pad(td["prompts"], p_max, left=True), responses=pad(td["responses"], r_max),
        attention_mask=attn, response_mask=pad(td["response_mask"], r_max), rollout_log_probs=pad(td["rollout_log_probs"], r_max),
        rollout_topk_ids=pad(td["rollout_topk_ids"], r_max), rollout_topk_logprobs=pad(td["rollout_topk_logprobs"], r_max, float("-inf")),
    )


def hook_then_loss(cfg, data, truth, advantages):
    """verl's ``ppo_loss`` twice, as the FSDP engine calls it: as the logits processor on ``truth["pi_logits"]``,
    then as the loss with the model_output it returned (log pi(a_t) from the same logits). ``advantages``: one
    ``[R_b]`` tensor per sample. Returns ``(loss, metrics)``."""
    import verl.workers.utils.losses as L
    from verl.utils import tensordict_utils as tu

    logits = truth["pi_logits"].float().unsqueeze(0)  # [1, N, V], as FSDP hands it over
    out = L.ppo_loss(cfg, student_logits=logits, data=data)
    cu = torch.tensor(truth["offsets"])
    ids = data["input_ids"].values()
    lp = torch.log_softmax(logits[0], -1).gather(-1, torch.roll(ids, -1)[:, None])[:, 0]
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(lp, cu)}
    for key, v in out.items():
        model_output[key] = torch.nested.nested_tensor_from_jagged(v[0], cu)
    data["old_log_probs"] = nested([torch.zeros(len(a)) for a in advantages])
    data["advantages"] = nested(advantages)
    n_tok = int(data["response_mask"].values().sum())
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=n_tok, global_batch_size=len(advantages))
    return L.ppo_loss(cfg, model_output, data)
