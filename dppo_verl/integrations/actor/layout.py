"""Where verl's actor puts each token: response-only batch tensors -> the rows of the logits the engine hands the hook.

Row semantics everywhere: logits row r predicts token r + 1, so response token j of a sequence with prompt
length P sits at row P - 1 + j. The rollout tensors are response-only (``rollout_topk_ids`` /
``rollout_topk_logprobs`` ``[B, R, K]``, ``rollout_log_probs`` ``[B, R]``, padded or nested); we scatter them
onto the packed full-sequence rows ``[N, ...]``, then reuse verl's own layout helpers (Ulysses
``slice_input_tensor``, Megatron ``preprocess_thd_engine`` / ``preprocess_bshd_engine``) so our rows line up with
the logits exactly as verl's distillation tensors do.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ...contract import ROLLOUT_LOG_PROBS, ROLLOUT_TOPK_IDS, ROLLOUT_TOPK_LOGPROBS, ROLLOUT_NUM_TOPK, TOPK_KEYS

__all__ = ["jagged_parts", "sequence_lengths", "response_values", "total_rows", "response_rows",
           "packed_support_inputs", "layout_like_logits", "megatron_layout_of", "flat_fields", "logit_slabs",
           "ResponsePadding", "response_padding", "pad_responses", "pad_model_outputs", "output_rows", "offsets_of"]


def jagged_parts(x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(values [sum L, ...], offsets [B + 1])`` of a jagged nested tensor (verl's engine path), None for a dense one.

    Read from the nested tensor's own fields when it has them: ``x.values()`` / ``x.offsets()`` / ``x.is_nested``
    dispatch through the nested subclass, some 50 us per ``values()`` on a CPU, paid several times per micro-batch
    (the plugin's whole per-micro-batch budget at a small vocabulary is a few ms). The public calls remain the
    fallback, and a test compares the two."""
    values, offsets = getattr(x, "_values", None), getattr(x, "_offsets", None)
    if isinstance(values, torch.Tensor) and isinstance(offsets, torch.Tensor) and getattr(x, "_lengths", None) is None:
        return values, offsets
    if x.is_nested:
        return x.values(), x.offsets()
    return None


def sequence_lengths(data) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample prompt and response lengths ``([B], [B])``, exactly as verl's ``no_padding_2_padding``."""
    prompts, responses = data["prompts"], data["responses"]
    p_parts = jagged_parts(prompts)
    if p_parts is not None:
        return p_parts[1].diff(), jagged_parts(responses)[1].diff()
    attn = data["attention_mask"]
    p = prompts.shape[1]
    return attn[:, :p].sum(1), attn[:, p:].sum(1)


def response_values(name: str, x: torch.Tensor, resp_lens: torch.Tensor, checks=None) -> torch.Tensor:
    """Response-only ``[B, R(_i), ...]`` (nested or right-padded) -> packed ``[sum_b R_b, ...]``.

    Nested (verl's engine path): ``x.values()``, no device read; the per-sample lengths are compared on the device
    and the flag queued on ``checks`` (a :class:`~dppo_verl.ops.checks.DeferredChecks`; None reads it here).
    Right-padded (outside verl's engine): a boolean gather, which reads the device (data-dependent shape)."""
    parts = jagged_parts(x)
    if parts is not None:
        got = parts[1].diff()
        own = checks is None
        if own:
            from ...ops.checks import DeferredChecks

            checks = DeferredChecks()
        if got.shape != resp_lens.shape:
            raise ValueError(f"{name}: {got.numel()} samples, the responses have {resp_lens.numel()}")
        checks.add(got != resp_lens.to(got.device), lambda idx: (
            f"{name}: per-sample lengths {got.tolist()} differ from the responses' {resp_lens.tolist()} "
            f"(first at sample {idx[0]})"))
        if own:
            checks.run()
        return parts[0]
    if x.shape[1] < int(resp_lens.max()):
        raise ValueError(f"{name} has shape {list(x.shape)}: shorter than the longest response ({int(resp_lens.max())})")
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < resp_lens.to(x.device)[:, None]  # [B, T]
    return x[keep]


def total_rows(data) -> tuple[int, int]:
    """(N, R): packed full-sequence rows and response tokens of the micro-batch, host ints. Nested inputs (verl's
    engine path) carry them in their values' shapes (no device read); the padded form reads the attention mask."""
    prompts, responses = jagged_parts(data["prompts"]), jagged_parts(data["responses"])
    if prompts is not None and responses is not None:
        return prompts[0].shape[0] + responses[0].shape[0], responses[0].shape[0]
    p_lens, r_lens = sequence_lengths(data)
    return int((p_lens + r_lens).sum()), int(r_lens.sum())


def response_rows(starts: torch.Tensor, r_lens: torch.Tensor, total: int) -> torch.Tensor:
    """``[sum R]``: ``starts[b] + j`` for j < R_b, in sample order. ``total`` (= sum R, a host int) is passed as the
    output size: without it ``repeat_interleave`` reads the device to size its output."""
    first = torch.repeat_interleave(r_lens.cumsum(0) - r_lens, r_lens, output_size=total)  # [sum R]
    return torch.repeat_interleave(starts, r_lens, output_size=total) + torch.arange(total, device=r_lens.device) - first


class ResponsePadding(NamedTuple):
    """Where each response token of a micro-batch goes in the padded ``[B, T]`` layout verl's
    ``no_padding_2_padding`` gives ``log_prob`` / ``old_log_probs`` (T = ``max_response_len``, else the longest
    response; the dense legacy layout keeps its padded width). ``R = sum_b R_b``."""

    shape: tuple  # (B, T)
    dst: torch.Tensor  # [R] flat index into [B * T]
    full_rows: torch.Tensor  # [R] row in the packed full-sequence values (model outputs): offsets[b] + P_b - 1 + j
    r_lens: torch.Tensor  # [B]


def response_padding(data, padded: bool = True) -> ResponsePadding:
    """The micro-batch's :class:`ResponsePadding`, computed once and shared by every field the hand-off pads. No device
    read with verl's nested micro-batches when ``max_response_len`` is set (verl's engine path sets it).
    ``padded=False``: only ``full_rows`` and ``r_lens`` (for response-only outputs that stay nested, e.g. verl's pi_old
    pass): no width, so never the device read that sizing it may take; ``shape`` is ``(B, None)``, ``dst`` None."""
    from verl.utils import tensordict_utils as tu

    p_lens, r_lens = sequence_lengths(data)
    n, r_total = total_rows(data)
    seq_ends = (p_lens + r_lens).cumsum(0)
    full_rows = response_rows(seq_ends - r_lens - 1, r_lens, r_total)
    if not padded:
        return ResponsePadding((len(r_lens), None), None, full_rows, r_lens)
    responses = jagged_parts(data["responses"])
    if responses is None:
        width = data["responses"].shape[1]  # dense legacy layout: verl keeps the padded width
    else:
        width = tu.get_non_tensor_data(data=data, key="max_response_len", default=-1)
        if width is None or width < 0:
            cached = getattr(data["responses"], "_maybe_max_seqlen", None)
            width = int(r_lens.max()) if cached is None else cached
    width, b = int(width), len(r_lens)
    dst = response_rows(torch.arange(b, device=r_lens.device) * width, r_lens, r_total)
    return ResponsePadding((b, width), dst, full_rows, r_lens)


def output_rows(pad: ResponsePadding, x: torch.Tensor) -> torch.Tensor:
    """A per-row model output over the full sequences (nested ``[B, S_b, ...]`` or packed ``[N, ...]``) -> its
    response rows ``[R, ...]``, in sample order (one gather)."""
    parts = jagged_parts(x)
    full = x if parts is None else parts[0]
    return full[pad.full_rows.to(full.device)]


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> ``[B + 1]`` jagged offsets (0, cumulative sums), on the lengths' device."""
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.long, device=lengths.device)
    offsets[1:] = lengths.cumsum(0)
    return offsets


def pad_responses(pad: ResponsePadding, values: torch.Tensor) -> torch.Tensor:
    """Packed response values ``[R, ...]`` -> ``[B, T, ...]``, zero-padded, by one scatter (no boolean mask)."""
    b, width = pad.shape
    if pad.dst is None:  # a programming error, not a data one: say which call made it
        raise ValueError("pad_responses needs a padded layout: this ResponsePadding came from "
                         "response_padding(data, padded=False) (full_rows and r_lens only)")
    out = values.new_zeros((b * width,) + tuple(values.shape[1:]))
    out[pad.dst.to(values.device)] = values
    return out.view((b, width) + tuple(values.shape[1:]))


def pad_model_outputs(pad: ResponsePadding, outputs: dict) -> dict:
    """Per-row model outputs over the full sequences (nested ``[B, S_b]`` or packed ``[N]``, as the engine returns
    them) -> ``[B, T]`` each, the values verl's ``no_padding_2_padding`` gives, in one gather and one scatter per dtype
    instead of verl's per-sample loop per output (which also reads the device)."""
    flat = {}
    for key, x in outputs.items():
        parts = jagged_parts(x)
        flat[key] = x if parts is None else parts[0]
    padded = {}
    for dtype in {v.dtype for v in flat.values()}:
        keys = [k for k, v in flat.items() if v.dtype == dtype]
        rows = pad_responses(pad, output_rows(pad, torch.stack([flat[k] for k in keys], -1)))  # [N, F] -> [B, T, F]
        padded.update(zip(keys, rows.unbind(-1)))
    return {k: padded[k] for k in outputs}


def packed_support_inputs(data, num_topk: int, checks=None, extra=()) -> dict[str, torch.Tensor]:
    """Scatter the response-only rollout tensors onto packed full-sequence rows ``[N_total, ...]``.

    Returns ``topk_ids [N, K]`` int64, ``topk_logp [N, K]`` fp32 (-inf off-response), ``sampled [N]`` int64,
    ``mu [N]`` fp32, ``row_valid [N]`` bool (True on rows that predict a response token with
    ``response_mask`` 1) and ``offsets [B + 1]`` (packed sequence boundaries). With nested inputs (verl's engine
    path) no device read: the length checks are queued on ``checks``. ``extra``: ``(name, batch key, fill)`` triples,
    more response-only fields scattered the same way (fp32, ``fill`` off-response), e.g. pi_old's for anchor=old.
    """
    missing = [k for k in TOPK_KEYS + (ROLLOUT_LOG_PROBS,) if k not in data.keys()]
    if missing:
        raise ValueError(
            f"Top-K DPPO needs batch keys {missing}: the rollout must return top-K logprobs "
            f"(+{ROLLOUT_NUM_TOPK}={num_topk}, rollout.calculate_log_probs=True); "
            "a Top-K mode never falls back to binary"
        )
    p_lens, r_lens = sequence_lengths(data)
    n, r_total = total_rows(data)
    seq_lens = p_lens + r_lens
    offsets = offsets_of(seq_lens)
    # row of response token j of sample b: offsets[b] + P_b - 1 + j
    rows = response_rows(offsets[:-1] + p_lens - 1, r_lens, r_total)  # [sum R]

    keys = [ROLLOUT_TOPK_IDS, ROLLOUT_TOPK_LOGPROBS, "responses", ROLLOUT_LOG_PROBS, "response_mask"]
    keys += [key for _, key, _ in extra if key in data.keys()]
    vals = dict(zip(keys, _many_response_values(data, keys, r_lens, checks)))
    ids = vals[ROLLOUT_TOPK_IDS]
    logp = vals[ROLLOUT_TOPK_LOGPROBS]
    if ids.dim() != 2 or ids.shape[-1] != num_topk or logp.shape != ids.shape:
        raise ValueError(
            f"rollout_topk_ids / rollout_topk_logprobs have per-token shapes {list(ids.shape[1:])} / "
            f"{list(logp.shape[1:])}, expected [{num_topk}] (policy_loss.num_topk); set "
            f"+{ROLLOUT_NUM_TOPK}={num_topk} on the rollout side"
        )
    dev = ids.device
    out = {
        "topk_ids": torch.zeros(n, num_topk, dtype=torch.long, device=dev),
        "topk_logp": torch.full((n, num_topk), float("-inf"), dtype=torch.float32, device=dev),
        "sampled": torch.zeros(n, dtype=torch.long, device=dev),
        "mu": torch.zeros(n, dtype=torch.float32, device=dev),
        "row_valid": torch.zeros(n, dtype=torch.bool, device=dev),
    }
    rows = rows.to(dev)
    out["topk_ids"][rows] = ids.long()
    out["topk_logp"][rows] = logp.float()
    out["sampled"][rows] = vals["responses"].long()
    out["mu"][rows] = vals[ROLLOUT_LOG_PROBS].float()
    out["row_valid"][rows] = vals["response_mask"].bool()
    for name, key, fill in extra:
        if key not in data.keys():
            raise ValueError(
                f"policy_loss.anchor=old: batch key {key!r} is missing; it is written by verl's pi_old pass (V1 trainer "
                "with algorithm.rollout_correction.bypass_mode=False; for the Top-K modes the dppo_verl actor "
                "integration adds the top-K ranks to that pass)")
        v = vals[key].float()
        out[name] = torch.full((n,) + tuple(v.shape[1:]), fill, dtype=torch.float32, device=dev)
        out[name][rows] = v
    out["offsets"] = offsets
    return out


def _many_response_values(data, keys: list, r_lens: torch.Tensor, checks) -> list:
    """:func:`response_values` of several batch keys; with verl's nested micro-batches their per-sample lengths are
    compared with the responses' in one queued flag (not one per key: a few small ops each, per micro-batch)."""
    parts = [jagged_parts(data[k]) for k in keys]
    if checks is None or any(p is None or p[1].shape != (len(r_lens) + 1,) for p in parts):
        return [response_values(k, data[k], r_lens, checks) for k in keys]  # one check per key, exact messages
    got = torch.stack([p[1] for p in parts]).diff(dim=-1)  # [F, B]
    checks.add(got != r_lens.to(got.device), lambda idx: (
        f"{keys[idx[0]]}: per-sample lengths {got[idx[0]].tolist()} differ from the responses' {r_lens.tolist()} "
        f"(first at sample {idx[1]})"))
    return [p[0] for p in parts]


def megatron_layout_of(data) -> "MegatronLayout":
    """The row layout verl's Megatron forward gave the logits of this micro-batch: from the engine call in progress
    (:mod:`.engine_context`), else (the processor called outside an engine, e.g. directly) what the batch says."""
    from verl.utils import tensordict_utils as tu

    from .engine_context import MegatronLayout, current_call

    call = current_call()
    if call is not None and call.megatron is not None:
        return call.megatron
    return MegatronLayout(local_cp_size=tu.get_non_tensor_data(data=data, key="local_cp_size", default=None),
                          forced_max_seqlen=tu.get_non_tensor_data(data=data, key="forced_max_seqlen", default=None))


def layout_like_logits(x: torch.Tensor, offsets: torch.Tensor, data_format: Optional[str],
                       megatron: "Optional[MegatronLayout]" = None) -> torch.Tensor:
    """Packed ``[N, ...]`` -> the logits' row layout, with verl's own helpers and the very arguments verl's
    ``gptmodel_forward_model_engine`` gave them (``megatron``; defaults when None)."""
    if data_format is None:  # FSDP: packed rows, Ulysses-sliced when SP > 1
        from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor

        x = x.unsqueeze(0)
        if get_ulysses_sequence_parallel_world_size() > 1:
            x = slice_input_tensor(x, dim=1)
        return x
    from ..._compat import require
    from .engine_context import MegatronLayout

    m = megatron or MegatronLayout()
    util = "verl.models.mcore.util"
    nested = torch.nested.nested_tensor_from_jagged(x, offsets)
    if data_format == "thd":  # [1, N_pad / cp, ...]: per-sequence padding, CP split (zigzag or contiguous)
        return require(util, "preprocess_thd_engine")(
            nested, pre_process=True, use_fp8_padding=m.use_fp8_padding, local_cp_size=m.local_cp_size,
            pad_to_length_bucket=m.pad_to_length_bucket, cp_layout=m.cp_layout)[0]
    if data_format == "bshd":  # [B, S_pad, ...]: S_pad = forced_max_seqlen (the mini-batch maximum) when verl sets it
        return require(util, "preprocess_bshd_engine")(
            nested, pre_process=True, use_fp8_padding=m.use_fp8_padding, forced_max_seqlen=m.forced_max_seqlen)[0]
    raise ValueError(f"unknown data_format {data_format!r} from the Megatron engine")


def flat_fields(laid: dict, n_lead: int) -> dict:
    """The laid-out tensors with their ``n_lead`` leading (row) dims merged into one: ``[b, s, ...]`` -> ``[b * s, ...]``."""
    return {k: v.reshape((-1,) + tuple(v.shape[n_lead:])) for k, v in laid.items()}


def logit_slabs(student_logits: torch.Tensor, laid: dict) -> list:
    """``[b, s, V_local]`` logits and per-row tensors ``[b, s, ...]`` -> 2-D ``(logits [r, V_local], {key: [r, ...]})``
    slabs: one ``[b * s, V_local]`` view when the logits are contiguous (both engines hand them over so), else one
    per ``b`` (each ``logits[b]`` a 2-D view): never a copy of the logits."""
    lead = tuple(student_logits.shape[:-1])
    if student_logits.is_contiguous():
        return [(student_logits.view(-1, student_logits.shape[-1]), flat_fields(laid, len(lead)))]
    return [(student_logits[b], {k: v[b] for k, v in laid.items()}) for b in range(lead[0])]
