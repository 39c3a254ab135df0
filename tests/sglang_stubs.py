"""Run verl 0.9.1's own ``SGLangHttpServer.generate`` source on CPU, without SGLang installed.

The method is cut out of ``verl/workers/rollout/sglang_rollout/async_sglang_server.py`` (installed, or a patched
copy) with ``ast`` and compiled, under the file's name and line numbers, against stand-ins for the module globals
it uses. A NameError / TypeError from these stand-ins means verl's ``generate`` changed: re-read it before
trusting the top-K hook. The scripted tokenizer manager plays SGLang's role: it answers ``generate_request`` with
one output dict shaped like SGLang's (``meta_info["output_token_logprobs"]`` / ``["output_top_logprobs"]`` as
``(logprob, token_id, None)`` tuples, the latter only when ``top_logprobs_num`` > 0).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib.util
import logging
import secrets
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

SERVER_REL = Path("verl/workers/rollout/sglang_rollout/async_sglang_server.py")


def site_packages() -> Path:
    """The directory holding the installed ``verl`` package (found without importing verl)."""
    return Path(importlib.util.find_spec("verl").submodule_search_locations[0]).parent


@dataclass
class GenerateReqInput:  # the fields verl 0.9.1 passes (sglang.srt.managers.io_struct.GenerateReqInput has more)
    rid: Any = None
    input_ids: Any = None
    sampling_params: Any = None
    return_logprob: Any = None
    image_data: Any = None
    video_data: Any = None
    logprob_start_len: Any = None
    top_logprobs_num: Any = None
    return_routed_experts: bool = False
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    lora_path: Any = None


@dataclass
class TokenOutput:  # verl.workers.rollout.replica.TokenOutput's fields
    token_ids: list
    log_probs: Optional[list] = None
    routed_experts: Any = None
    stop_reason: Optional[str] = None
    num_preempted: Optional[int] = None
    extra_fields: dict = field(default_factory=dict)


class _Tracer:
    @staticmethod
    @contextlib.contextmanager
    def trace_state(*args, **kwargs):
        yield


def load_generate(path: Path, class_name: str = "SGLangHttpServer"):
    """``class_name.generate`` from the file at ``path``, as a plain function over the stand-in globals."""
    tree = ast.parse(path.read_text(), filename=str(path))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    fn = next(n for n in cls.body if isinstance(n, ast.AsyncFunctionDef) and n.name == "generate")
    # verl's own module-level helper for prompt log-probs, from the same file.
    helper_name = "_extract_prompt_logprobs_sglang"
    helper = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == helper_name)
    namespace = {
        "asyncio": asyncio,
        "secrets": secrets,
        "torch": torch,
        "Any": Any,
        "Optional": Optional,
        "GenerateReqInput": GenerateReqInput,
        "TokenOutput": TokenOutput,
        "RLInsightLogger": _Tracer,
        "logger": logging.getLogger("sglang_stubs"),
        "SGLANG_LORA_NAME": "lora",
    }
    exec(compile(ast.Module(body=[helper, fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["generate"]


def server_class(generate_fn, name: str = "SGLangHttpServer"):
    return type(name, (), {"generate": generate_fn})


@dataclass
class Step:
    """One generated token: the sampled id and its log-prob, and the engine's ranking ``[(id, logprob), ...]``."""

    sampled: int
    sampled_lp: float
    ranked: list


@dataclass
class Script:
    steps: list
    delay: float = 0.0  # seconds before the engine answers (to interleave concurrent requests)


class ScriptedTokenizerManager:
    """Answers ``generate_request(obj, request)`` from ``scripts[obj.rid]``; records every request object."""

    def __init__(self, scripts: dict):
        self.scripts = scripts
        self.received: list = []

    async def generate_request(self, obj, request=None):
        self.received.append(obj)
        script = self.scripts[obj.rid]
        await asyncio.sleep(script.delay)
        meta = {"finish_reason": {"type": "stop"}}
        n = obj.top_logprobs_num or 0
        if obj.return_logprob and obj.logprob_start_len == 0:  # prompt scoring: entry 0 has no log-prob
            meta["input_token_logprobs"] = [(None if p == 0 else -0.5, t, None) for p, t in enumerate(obj.input_ids)]
            meta["input_top_logprobs"] = [None] + [[(-0.1 * (r + 1), 100 + r, None) for r in range(n)]] * (
                len(obj.input_ids) - 1
            )
        if obj.return_logprob:
            meta["output_token_logprobs"] = [(s.sampled_lp, s.sampled, None) for s in script.steps]
            if n > 0:
                meta["output_top_logprobs"] = [[(lp, tid, None) for tid, lp in s.ranked[:n]] for s in script.steps]
        yield {"text": "", "output_ids": [s.sampled for s in script.steps], "meta_info": meta}


def make_server(cls, tokenizer_manager, k: Optional[int] = None):
    """An instance of ``cls`` with only the attributes verl's ``generate`` reads (no ``__init__``: no engine)."""
    server = object.__new__(cls)
    server.config = types.SimpleNamespace(
        max_model_len=64,
        prompt_length=16,
        response_length=16,
        enable_rollout_routing_replay=False,
        skip_tokenizer_init=True,
        mtp=None,
        custom={"dppo_num_topk": k} if k is not None else None,
    )
    server._disaggregation_role = "null"
    server._pd_decode_peers = []
    server.lora_as_adapter = False
    server.replica_rank = 0
    server.global_steps = 7
    server.tokenizer_manager = tokenizer_manager
    return server
