"""The SGLang integration against the real ``sglang`` package, on CPU.

CI installs sglang 0.5.23 ``--no-deps`` with ``tools/sglang_cpu_requirements.txt`` in a venv; without sglang
this whole module is skipped once (with that command); with sglang installed but not importing, it fails.

1. **The plugin in SGLang**: ``load_plugins()`` finds the entry point and calls ``register()`` in a fresh
   interpreter, which is then checked as the launcher uses it (argparse, ServerArgs resolution with the
   implied page size 64); in this process, ``register()`` idempotence, argparse, the page-size hook and the
   DeepSeek handler registry.
2. **SGLang's real ``FlashMLABackend`` on CPU**: the subclass built by the plugin runs SGLang's own eager
   metadata, CUDA-graph-buffer metadata, decode and MTP target-verify code, with the kernels re-bound to
   flashmla_ops (whose CPU kernel is the reference implementation), compared with an independent float64
   oracle (``_helpers.loop_oracle``); the deterministic backend (``--enable-deterministic-inference``): the
   launcher accepts it for the DeepSeek model, SGLang's metadata code plans batch-invariant decodes, a
   request decodes the same in any batch, and SGLang's CUDA-graph refresh fits the regrown buffer.

Fakes, and why:

* **torchvision**: see ``_sglang_cpu.py``.
* **flash_mla** (the sgl-flash-mla CUDA wheel behind SGLang 0.5.23's builtin FlashMLA): not installable on
  CPU. Nothing in the tests fakes it: the backend's own fallback (``import_flashmla_backend_module``) puts a
  stand-in interface module in ``sys.modules`` whose kernels raise, which also proves the flashmla_ops
  backend never calls the builtin kernels. With SGLang 0.5.17 on CPU, whose backend imports
  ``sgl_kernel.flash_mla`` (the CUDA-only sglang-kernel wheel), an empty fake ``sgl_kernel`` package is put in
  ``sys.modules`` so that the same fallback applies.
* SGLang's Triton kernel ``create_flashmla_kv_indices_triton`` cannot run on CPU: in the class built for
  group 2 only, it is bound to a Python loop with the same contract.
* ``ModelRunner``, ``ForwardBatch``, ``RadixAttention``, the KV pool: ``SimpleNamespace`` objects carrying
  the attributes the code reads.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from _helpers import loop_oracle
from _sglang_cpu import (
    HANDLER_MODULE,
    SGLANG_INSTALLED,
    SGLANG_SKIP_REASON,
    import_sglang_on_cpu,
)
from flashmla_ops.integration import sglang_backend, sglang_plugin
from flashmla_ops.integration.sglang_plugin import BACKEND_NAME

import flashmla_ops

if not SGLANG_INSTALLED:
    pytest.skip(SGLANG_SKIP_REASON, allow_module_level=True)


# ==== 1. The plugin in SGLang ============================================================================
@pytest.fixture(scope="module")
def sglang_cpu() -> str:
    """Import the CPU-importable part of SGLang, with a fake torchvision if the real one does not load."""
    if not SGLANG_INSTALLED:
        pytest.skip(SGLANG_SKIP_REASON)
    try:
        return import_sglang_on_cpu()
    except ImportError as e:
        pytest.fail(
            f"sglang is installed but does not import on CPU ({e}); install the pinned CPU requirements: "
            "pip install --no-deps -r tools/sglang_cpu_requirements.txt"
        )


_LAUNCHER_SCRIPT = textwrap.dedent(
    """
    import argparse, importlib.util, json, sys
    sys.path.insert(0, sys.argv[1])  # tests/, for this test module and _helpers
    spec = importlib.util.spec_from_file_location("sglang_plugin_tests", sys.argv[2])
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    result = {"torchvision": tests.import_sglang_on_cpu()}

    import flashmla_ops.integration.sglang_plugin as plugin
    calls, statuses = [], []
    real_register = plugin.register
    def counting_register():
        calls.append(1)
        statuses.append(real_register())
    plugin.register = counting_register  # what the entry point resolves to when SGLang loads it

    from sglang.srt.plugins import load_plugins
    load_plugins()
    load_plugins()  # idempotent: SGLang loads plugins once per process
    result["register_calls"] = len(calls)
    result["status"] = statuses[0] if statuses else None
    result["handler_module_imported"] = sys.modules.get(tests.HANDLER_MODULE) is not None

    from sglang.srt.server_args import (
        ATTENTION_BACKEND_CHOICES, CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS, ServerArgs,
    )
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry
    result["choices"] = ATTENTION_BACKEND_CHOICES.count("flashmla_ops")
    result["chunked"] = CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS.count("flashmla_ops")
    factory = ATTENTION_BACKENDS.get("flashmla_ops")
    result["factory"] = f"{factory.__module__}.{factory.__qualname__}" if factory else None
    result["hook_applied"] = plugin.PAGE_SIZE_HOOK_TARGET in HookRegistry._patched

    # The launcher's path: argparse (prepare_server_args), then the server-args resolution.
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.arg_groups.overrides import resolved_view
    def resolve(backend_args):
        argv = ["--model-path", sys.argv[3], "--skip-tokenizer-init", "--load-format", "dummy",
                "--device", "cpu"] + backend_args
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        namespace = parser.parse_args(argv)
        parsed = {k: getattr(namespace, k) for k in
                  ("attention_backend", "decode_attention_backend", "prefill_attention_backend")}
        try:
            args = prepare_server_args(argv)  # 0.5.17 resolves here (__post_init__), 0.5.23 in resolve_once()
            if hasattr(args, "resolve_once"):  # 0.5.23: resolution is deferred
                args.resolve_once()
                args = resolved_view(args)
        except ValueError as e:  # SGLang's own validation, e.g. of --enable-deterministic-inference
            return {"parsed": parsed, "error": str(e)}
        fields = ("page_size", "attention_backend", "enable_deterministic_inference", "disable_radix_cache")
        return {"parsed": parsed} | {k: getattr(args, k) for k in fields}
    resolved = {}
    deterministic = ["--enable-deterministic-inference"]
    for label, backend_args in [
        ("flashmla_ops", ["--attention-backend", "flashmla_ops"]),
        ("flashmla_ops_decode", ["--prefill-attention-backend", "triton",
                                 "--decode-attention-backend", "flashmla_ops"]),
        ("flashmla_ops_page_32", ["--attention-backend", "flashmla_ops", "--page-size", "32"]),
        ("flashmla", ["--attention-backend", "flashmla"]),
        ("triton", ["--attention-backend", "triton"]),
        ("deterministic_flashmla_ops", ["--attention-backend", "flashmla_ops"] + deterministic),
        ("deterministic_flashmla_ops_no_radix",
         ["--attention-backend", "flashmla_ops", "--disable-radix-cache"] + deterministic),
        ("deterministic_flashmla", ["--attention-backend", "flashmla"] + deterministic),
        ("deterministic_triton", ["--attention-backend", "triton"] + deterministic),
    ]:
        resolved[label] = resolve(backend_args)
    result["resolved"] = resolved
    print("RESULT " + json.dumps(result))
    """
)


def _write_tiny_deepseek_v2_config(path: Path) -> None:
    """A config-only DeepSeek-V2 MLA model directory (kv_lora_rank 512, rope 64), enough to resolve args."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "vocab_size": 512,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 512,
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "bfloat16",
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))


@pytest.fixture(scope="module")
def launcher_result(sglang_cpu, tmp_path_factory) -> dict:
    """Run SGLang's plugin loading and argument handling in a fresh interpreter, as ``launch_server`` does."""
    model = tmp_path_factory.mktemp("tiny_dsv2")
    _write_tiny_deepseek_v2_config(model)
    env = dict(os.environ, SGLANG_PLUGINS=BACKEND_NAME, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCHER_SCRIPT, str(Path(__file__).parent), __file__, str(model)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=model,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    result = json.loads(lines[-1][len("RESULT ") :])
    result["log"] = proc.stderr + proc.stdout
    return result


def test_load_plugins_discovers_the_entry_point_and_calls_register_once(launcher_result):
    assert launcher_result["register_calls"] == 1
    status = launcher_result["status"]
    assert status["argparse_choices"] == "registered"
    assert status["chunked_prefix_cache"] == "registered"
    assert status["attention_backend_factory"] == "registered"
    assert status["page_size_hook"] == "registered"
    assert status["deterministic_choices"] == "registered"
    assert status["deterministic_mla_models"] == "registered"
    assert status["deterministic_radix_cache"] == "registered"
    assert launcher_result["choices"] == 1 and launcher_result["chunked"] == 1
    assert launcher_result["factory"] == "flashmla_ops.integration.sglang_plugin.create_backend"
    assert launcher_result["hook_applied"]


def test_register_defers_the_cuda_touching_deepseek_handler_import(launcher_result):
    assert launcher_result["status"]["deepseek_handler"].startswith("deferred")
    assert not launcher_result["handler_module_imported"]


def test_launcher_parses_the_backend_flags(launcher_result):
    resolved = launcher_result["resolved"]
    assert resolved["flashmla_ops"]["parsed"]["attention_backend"] == BACKEND_NAME
    assert resolved["flashmla_ops_decode"]["parsed"] == {
        "attention_backend": None,
        "decode_attention_backend": BACKEND_NAME,
        "prefill_attention_backend": "triton",
    }


def test_launcher_implies_page_size_64_like_the_builtin_flashmla(launcher_result):
    resolved = launcher_result["resolved"]
    assert resolved["flashmla"]["page_size"] == 64  # SGLang's own rule for its builtin backend
    assert resolved["flashmla_ops"]["page_size"] == 64
    assert resolved["flashmla_ops_decode"]["page_size"] == 64
    assert resolved["flashmla_ops_page_32"]["page_size"] == 64
    assert resolved["triton"]["page_size"] != 64  # the hook leaves other backends alone
    assert "flashmla_ops attention backend only supports a page_size of 64" in launcher_result["log"]


def test_launcher_accepts_deterministic_inference_with_flashmla_ops(launcher_result):
    """The tiny model is a DeepSeek-V2 (absorbed MLA): SGLang admits only its listed backends to deterministic
    inference for it. flashmla_ops is accepted, with the implied page size and the radix cache off (its
    FlashInfer prefill after a prefix hit is not the cold prefill); the builtin flashmla still is not."""
    resolved = launcher_result["resolved"]
    ours = resolved["deterministic_flashmla_ops"]
    assert "error" not in ours, ours
    assert ours["attention_backend"] == BACKEND_NAME and ours["enable_deterministic_inference"]
    assert ours["page_size"] == 64 and ours["disable_radix_cache"] is True
    assert "disabling the radix cache" in launcher_result["log"]
    assert resolved["deterministic_flashmla_ops_no_radix"]["disable_radix_cache"] is True
    assert resolved["flashmla_ops"]["disable_radix_cache"] is False  # only under deterministic inference
    assert "supported for deterministic inference" in resolved["deterministic_flashmla"]["error"]
    triton = resolved["deterministic_triton"]  # SGLang's radix-safe backend keeps its cache
    assert "error" not in triton and triton["disable_radix_cache"] is False


def test_register_is_idempotent(sglang_cpu):
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import (
        ATTENTION_BACKEND_CHOICES,
        CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS,
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
        RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND,
    )

    first = sglang_plugin.register()
    assert not any(v.startswith("failed") for v in first.values()), first
    for _ in range(3):
        again = sglang_plugin.register()
        assert again["argparse_choices"] == "already registered"
        assert again["chunked_prefix_cache"] == "already registered"
        assert again["attention_backend_factory"] == "already registered"
        assert again["page_size_hook"] == "already registered"
        assert again["deepseek_handler"] in (first["deepseek_handler"], "already registered")
        for step in ("deterministic_choices", "deterministic_mla_models", "deterministic_radix_cache"):
            assert again[step] == "already registered"
    assert ATTENTION_BACKEND_CHOICES.count(BACKEND_NAME) == 1
    assert CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS.count(BACKEND_NAME) == 1
    assert DETERMINISTIC_ATTENTION_BACKEND_CHOICES.count(BACKEND_NAME) == 1
    assert RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND.count(BACKEND_NAME) == 1
    try:  # 0.5.23: a wrapper of the resolution step; 0.5.17: an AFTER hook of the ServerArgs method
        from sglang.srt.arg_groups.resolution_hooks import _HOOKS

        wrappers = _HOOKS[sglang_plugin.DETERMINISTIC_RESOLUTION_STEP]
    except ImportError:
        wrappers = [hook for _t, hook, *_s in HookRegistry._hooks[sglang_plugin.DETERMINISTIC_HOOK_TARGET]]
    assert (
        sum(sglang_plugin._is_ours(w, sglang_plugin._deterministic_radix_cache_step) for w in wrappers)
        + sum(sglang_plugin._is_ours(w, sglang_plugin._deterministic_radix_cache_hook) for w in wrappers)
        == 1
    )
    assert ATTENTION_BACKENDS[BACKEND_NAME] is sglang_plugin.create_backend
    hooks = HookRegistry._hooks[sglang_plugin.PAGE_SIZE_HOOK_TARGET]
    assert sum(hook is sglang_plugin._page_size_hook for _t, hook, *_s in hooks) == 1
    assert (
        "flashmla" in ATTENTION_BACKENDS
        and ATTENTION_BACKENDS["flashmla"] is not ATTENTION_BACKENDS[BACKEND_NAME]
    )


def test_argparse_accepts_flashmla_ops_and_still_rejects_unknown_names(sglang_cpu, capsys):
    from sglang.srt.server_args import ServerArgs

    sglang_plugin.register()
    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(
        ["--model-path", "m", "--attention-backend", BACKEND_NAME, "--decode-attention-backend", BACKEND_NAME]
        + ["--prefill-attention-backend", BACKEND_NAME, "--page-size", "64"]
    )
    assert (args.attention_backend, args.decode_attention_backend, args.prefill_attention_backend) == (
        (BACKEND_NAME,) * 3
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "m", "--attention-backend", "flashmla_ops_not_registered"])
    assert "invalid choice" in capsys.readouterr().err


class _View:
    """A fake ResolvedView: the given fields, None for every other one."""

    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)

    def __getattr__(self, name: str) -> None:
        return None


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({"attention_backend": BACKEND_NAME, "page_size": 1}, {"page_size": 64}),
        ({"attention_backend": BACKEND_NAME, "page_size": None}, {"page_size": 64}),
        ({"decode_attention_backend": BACKEND_NAME, "page_size": 16}, {"page_size": 64}),
        ({"prefill_attention_backend": BACKEND_NAME, "page_size": 1}, {"page_size": 64}),
        ({"attention_backend": BACKEND_NAME, "page_size": 64}, {}),
        ({"attention_backend": "triton", "page_size": 1}, {}),
        ({"attention_backend": "flashmla", "page_size": 1}, {"page_size": 64}),  # SGLang's own rule
    ],
)
def test_page_size_hook_in_sglangs_resolution_pass(sglang_cpu, fields, expected):
    sglang_plugin.register()
    overrides = importlib.import_module("sglang.srt.arg_groups.overrides")
    assert overrides._mla_backend_page_constraints(_View(**fields)) == expected
    try:  # 0.5.23 runs the pass from attention_hook, which bound it with `from ... import`
        attention_hook = importlib.import_module("sglang.srt.arg_groups.attention_hook")
    except ImportError:
        return
    assert attention_hook._mla_backend_page_constraints is overrides._mla_backend_page_constraints


def test_deepseek_handler_is_registered_like_builtin_flashmla(sglang_cpu):
    assert sglang_plugin._register_deepseek_handler(import_module=True) in (
        "registered",
        "already registered",
    )
    handler = importlib.import_module(HANDLER_MODULE)
    registry = handler.AttentionBackendRegistry
    assert registry.get_handler(BACKEND_NAME) is handler.handle_attention_flashmla
    assert registry.get_handler("flashmla") is handler.handle_attention_flashmla
    assert registry.get_handler(BACKEND_NAME) is not registry.get_handler("triton")
    assert sglang_plugin.register()["deepseek_handler"] == "already registered"


# ==== 2. SGLang's real FlashMLABackend on CPU ===============================================================
@pytest.fixture(scope="module")
def flashmla_backend_module(sglang_cpu) -> types.ModuleType:
    try:
        return sglang_backend.import_flashmla_backend_module()
    except ImportError as e:
        if e.name != "sgl_kernel":
            raise
    # SGLang <= 0.5.22 (e.g. 0.5.17) imports the kernels from the sglang-kernel wheel (`sgl_kernel`), which is
    # CUDA-only: an empty fake package lets `sgl_kernel.flash_mla` fail alone, as in a wheel without it.
    fake = types.ModuleType("sgl_kernel", "fake sgl_kernel package (CPU tests)")
    fake.__path__ = []
    sys.modules["sgl_kernel"] = fake
    return sglang_backend.import_flashmla_backend_module()


def test_real_flashmla_backend_rebound_methods(flashmla_backend_module):
    base = flashmla_backend_module.FlashMLABackend
    users = sglang_backend.kernel_users(base)
    assert set(users) == sglang_backend.EXPECTED_REBOUND_METHODS, users
    cls = sglang_backend.get_backend_class()
    assert cls is sglang_backend.get_backend_class()  # built once per process
    assert issubclass(cls, base) and cls.rebound_methods == sglang_backend.EXPECTED_REBOUND_METHODS
    for name in sglang_backend.EXPECTED_REBOUND_METHODS:
        ours, builtin = getattr(cls, name), getattr(base, name)
        assert ours is not builtin and ours.__code__ is builtin.__code__
        assert ours.__globals__["flash_mla_with_kvcache"] is sglang_backend.flash_mla_with_kvcache
        assert ours.__globals__["get_mla_metadata"] is sglang_backend.get_mla_metadata
        # the FP8 branches' q quantiser is the pass-through (q stays bf16 for flashmla_ops' FP8 kernels)
        assert ours.__globals__["scaled_fp8_quant"] is sglang_backend.keep_q_unquantised
        # the builtin backend still uses SGLang's kernels (or the stand-in, where they are not installed)
        assert builtin.__globals__ is vars(flashmla_backend_module)
    assert flashmla_backend_module.flash_mla_with_kvcache is not sglang_backend.flash_mla_with_kvcache
    assert flashmla_backend_module.scaled_fp8_quant is not sglang_backend.keep_q_unquantised
    for name in sglang_backend.KERNEL_GLOBALS:  # 0.5.17: sgl_kernel.flash_mla; 0.5.23: flash_mla_interface
        assert getattr(flashmla_backend_module, name).__module__ in sglang_backend.KNOWN_KERNEL_MODULES


def test_builtin_kernel_stand_in_raises_when_the_kernel_package_is_missing(flashmla_backend_module):
    interface = sys.modules.get("sglang.kernels.ops.attention.flash_mla_interface") or sys.modules.get(
        "sgl_kernel.flash_mla"
    )
    if not getattr(interface, "__flashmla_ops_standin__", False):
        pytest.skip("SGLang's builtin FlashMLA kernels are installed here; no stand-in was needed")
    with pytest.raises(RuntimeError, match="builtin FlashMLA kernels are not installed"):
        flashmla_backend_module.flash_mla_with_kvcache()


class _CpuKvIndicesKernel:
    """``create_flashmla_kv_indices_triton[grid](...)`` on CPU: row i gets the page ids of request i."""

    def __getitem__(self, grid: tuple[int, ...]):
        def run(req_to_token, req_pool_indices, seq_lens, kv_start_idx, out, req_stride, out_stride):
            assert kv_start_idx is None
            for i in range(grid[0]):
                pages = -(-int(seq_lens[i]) // 64)
                req = int(req_pool_indices[i])
                out[i, :pages] = (req_to_token[req, 0 : pages * 64 : 64] // 64).to(out.dtype)

        return run


class _KvPool:
    def __init__(self, kv: torch.Tensor) -> None:
        self.kv = kv

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.kv


def _dcp_disabled():
    from sglang.srt.runtime_context import get_parallel

    parallel = get_parallel()
    return parallel.override(dcp_enabled=False) if hasattr(parallel, "override") else contextlib.nullcontext()


def _cpu_backend(cls: type, *, heads: int, draft_tokens: int | None, max_context: int, seed: int):
    """An instance of ``cls`` with the attributes FlashMLABackend's metadata / forward code reads."""
    gen = torch.Generator().manual_seed(seed)
    max_bs = 8
    pages_per_req = max_context // 64
    num_pages = 1 + max_bs * pages_per_req  # page 0 is SGLang's padding page
    req_to_token = torch.zeros(max_bs, max_context, dtype=torch.int32)
    order = torch.randperm(num_pages - 1, generator=gen) + 1
    for r in range(max_bs):
        for p in range(pages_per_req):
            page = int(order[r * pages_per_req + p])
            req_to_token[r, p * 64 : (p + 1) * 64] = page * 64 + torch.arange(64, dtype=torch.int32)
    kv = torch.randn(num_pages * 64, 1, 576, generator=gen).to(torch.bfloat16)  # [slots, 1, 576]
    backend = object.__new__(cls)
    backend.__dict__.update(
        req_to_token=req_to_token,
        num_q_heads=heads,
        num_local_heads=heads,
        num_draft_tokens=draft_tokens,
        is_fp8_kvcache=False,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        kv_cache_dim=576,
        max_context_len=max_context,
        device=torch.device("cpu"),
        page_size=64,
        token_to_kv_pool=_KvPool(kv),
        dcp_world_size=1,
        kv_index_translator=types.SimpleNamespace(reads_are_translated=False),  # 0.5.23
        forward_metadata=None,
        _eager_kv_indices_buf=None,
        # init_cuda_graph_state's buffers, sized as it sizes them (an H100 has 132 SMs)
        cuda_graph_kv_indices=torch.full((max_bs, (max_context + 64) // 64), 1, dtype=torch.int32),
        cuda_graph_mla_metadata=torch.empty(132, 8, dtype=torch.int32),
        cuda_graph_num_splits=torch.empty(max_bs + 1, dtype=torch.int32),
        cuda_graph_mla_metadata_view=None,
        cuda_graph_num_splits_view=None,
        cuda_graph_draft_extend_seq_lens_k=torch.ones(max_bs, dtype=torch.int32),
    )
    return backend, kv


def _oracle(q: torch.Tensor, kv: torch.Tensor, block_table: torch.Tensor, lens: list[int], scale: float):
    out, _ = loop_oracle(q, kv.view(-1, 64, 1, 576), block_table, lens, scale, causal=True)
    return out


@pytest.mark.parametrize("graph_buffers", [False, True], ids=["eager", "cuda_graph_buffers"])
def test_real_backend_decode_on_cpu(flashmla_backend_module, graph_buffers):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    cls = sglang_backend.build_backend_class(
        flashmla_backend_module.FlashMLABackend,
        _extra_globals={"create_flashmla_kv_indices_triton": _CpuKvIndicesKernel()},
    )
    heads, lens, scale = 16, [5, 70, 130], 0.0721
    backend, kv = _cpu_backend(cls, heads=heads, draft_tokens=None, max_context=256, seed=1)
    seq_lens = torch.tensor(lens)
    batch = types.SimpleNamespace(
        batch_size=len(lens),
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(),
        req_pool_indices=torch.tensor([2, 0, 5]),
        forward_mode=ForwardMode.DECODE,
        kv_loc_plan=None,
        out_cache_loc=None,
    )
    if graph_buffers:
        backend.init_forward_metadata_out_graph(batch)  # the capture / replay path
    else:
        backend.init_forward_metadata(batch)
    meta = backend.forward_metadata
    ref_meta, ref_splits = flashmla_ops.get_mla_metadata(seq_lens.int(), heads, 1)
    assert torch.equal(meta.flashmla_metadata, ref_meta) and torch.equal(meta.num_splits, ref_splits)
    if graph_buffers:  # our [num_sm_parts, 8] / [b + 1] results live in prefixes of the static buffers
        assert meta.flashmla_metadata.data_ptr() == backend.cuda_graph_mla_metadata.data_ptr()
        assert meta.flashmla_metadata.shape == (132, 8)  # 132 // 1 // ceil(16 / 64)
        assert meta.num_splits.data_ptr() == backend.cuda_graph_num_splits.data_ptr()
        assert meta.block_kv_indices.data_ptr() == backend.cuda_graph_kv_indices.data_ptr()

    layer = types.SimpleNamespace(
        tp_q_head_num=heads, head_dim=576, v_head_dim=512, scaling=scale, layer_id=0, k_scale=None
    )
    q = torch.randn(len(lens), heads * 576, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with _dcp_disabled():
        out = backend.forward_decode(q, None, None, layer, batch, save_kv_cache=False)
    assert out.shape == (len(lens), heads * 512) and out.dtype == torch.bfloat16
    ref = _oracle(q.view(len(lens), 1, heads, 576), kv, meta.block_kv_indices, lens, scale)
    torch.testing.assert_close(out.double(), ref.reshape(len(lens), -1), atol=1e-2, rtol=1e-2)


def test_cuda_graph_replay_through_the_capture_time_block_table_view(flashmla_backend_module):
    """SGLang captures its decode graphs with the CPU lengths set to the fill value 1, so the block table the
    graph bakes in is ``cuda_graph_kv_indices[:bs, :1]``; every replay then serves longer requests through
    that one-column view (FlashMLA reads past it via the row stride). Emulated here: metadata for the
    capture batch, then the replay's metadata refresh (same static buffers, real lengths, no CPU mirror), then
    the forward with the capture-time views, as the graph would run it. On the H100 end-to-end run this was
    NaN for every request longer than one page before the adapter widened the view."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    cls = sglang_backend.build_backend_class(
        flashmla_backend_module.FlashMLABackend,
        _extra_globals={"create_flashmla_kv_indices_triton": _CpuKvIndicesKernel()},
    )
    heads, lens, scale = 16, [2, 65, 200, 129], 0.0721
    backend, kv = _cpu_backend(cls, heads=heads, draft_tokens=None, max_context=256, seed=7)
    bs = len(lens)
    seq_lens = torch.ones(bs, dtype=torch.int64)  # the graph runner's static buffer, filled with 1
    batch = types.SimpleNamespace(
        batch_size=bs,
        seq_lens=seq_lens,
        seq_lens_cpu=torch.ones(bs, dtype=torch.int64),
        req_pool_indices=torch.tensor([3, 1, 4, 0]),
        forward_mode=ForwardMode.DECODE,
        kv_loc_plan=None,
        out_cache_loc=None,
    )
    backend.init_forward_metadata_out_graph(batch, in_capture=True)
    captured = backend.forward_metadata
    assert captured.block_kv_indices.shape == (bs, 1)  # what the graph bakes in

    seq_lens.copy_(torch.tensor(lens))  # replay: new lengths in the static buffer, no CPU mirror
    batch.seq_lens_cpu = None
    backend.init_forward_metadata_out_graph(batch)
    backend.forward_metadata = captured  # the graph's kernels keep their capture-time arguments
    layer = types.SimpleNamespace(
        tp_q_head_num=heads, head_dim=576, v_head_dim=512, scaling=scale, layer_id=0, k_scale=None
    )
    q = torch.randn(bs, heads * 576, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    with _dcp_disabled():
        out = backend.forward_decode(q, None, None, layer, batch, save_kv_cache=False)
    full_table = backend.cuda_graph_kv_indices[:bs]
    ref = _oracle(q.view(bs, 1, heads, 576), kv, full_table, lens, scale)
    torch.testing.assert_close(out.double(), ref.reshape(bs, -1), atol=1e-2, rtol=1e-2)


def test_real_backend_mtp_target_verify_on_cpu(flashmla_backend_module):
    """MTP verify (s_q = 2 draft tokens per request, causal): SGLang's graph metadata and forward_extend."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    cls = sglang_backend.build_backend_class(
        flashmla_backend_module.FlashMLABackend,
        _extra_globals={"create_flashmla_kv_indices_triton": _CpuKvIndicesKernel()},
    )
    heads, draft, lens, scale = 64, 2, [1, 63, 200], 0.05
    backend, kv = _cpu_backend(cls, heads=heads, draft_tokens=draft, max_context=320, seed=4)
    seq_lens = torch.tensor(lens)  # prefix lengths; the verify step adds the draft tokens
    batch = types.SimpleNamespace(
        batch_size=len(lens),
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(),
        req_pool_indices=torch.tensor([1, 3, 7]),
        forward_mode=ForwardMode.TARGET_VERIFY,
        kv_loc_plan=None,
        out_cache_loc=None,
    )
    backend.init_forward_metadata_out_graph(batch)
    meta = backend.forward_metadata
    kv_lens = [n + draft for n in lens]
    # 132 SMs // ceil(2 * 64 / 64) = 66 partitions, within the [132, 8] buffer
    assert meta.flashmla_metadata.shape == (66, 8)
    ref_meta, _ = flashmla_ops.get_mla_metadata(torch.tensor(kv_lens, dtype=torch.int32), draft * heads, 1)
    assert torch.equal(meta.flashmla_metadata, ref_meta)
    layer = types.SimpleNamespace(
        tp_q_head_num=heads, head_dim=576, v_head_dim=512, scaling=scale, layer_id=0, k_scale=None
    )
    q = torch.randn(len(lens) * draft, heads * 576, generator=torch.Generator().manual_seed(5))
    out = backend.forward_extend(q.to(torch.bfloat16), None, None, layer, batch, save_kv_cache=False)
    assert out.shape == (len(lens) * draft, heads * 512)
    ref = _oracle(
        q.to(torch.bfloat16).view(len(lens), draft, heads, 576), kv, meta.block_kv_indices, kv_lens, scale
    )
    torch.testing.assert_close(out.double(), ref.reshape(len(lens) * draft, -1), atol=1e-2, rtol=1e-2)


def _decode_batch(backend, batch_lens: list[int], pools: list[int], q: torch.Tensor, layer, graph: bool):
    """Metadata (eager, or through the CUDA-graph buffers) and SGLang's forward_decode for one batch."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    seq_lens = torch.tensor(batch_lens)
    batch = types.SimpleNamespace(
        batch_size=len(batch_lens),
        seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(),
        req_pool_indices=torch.tensor(pools),
        forward_mode=ForwardMode.DECODE,
        kv_loc_plan=None,
        out_cache_loc=None,
    )
    if graph:
        backend.init_forward_metadata_out_graph(batch)
    else:
        backend.init_forward_metadata(batch)
    with _dcp_disabled():
        return backend.forward_decode(q, None, None, layer, batch, save_kv_cache=False)


@pytest.mark.parametrize("graph_buffers", [False, True], ids=["eager", "cuda_graph_buffers"])
def test_real_deterministic_backend_decodes_a_request_the_same_in_any_batch(
    flashmla_backend_module, graph_buffers
):
    """SGLang's FlashMLABackend code with the deterministic backend's kernels: the metadata is flashmla_ops'
    batch-invariant schedule, and the request in pool slot 2 decodes bitwise the same alone and in batches
    of other requests (other lengths, other positions)."""
    heads, scale, bound = 16, 0.0721, 256
    cls = sglang_backend.build_backend_class(
        flashmla_backend_module.FlashMLABackend,
        max_seqlen_k=bound,
        _extra_globals={"create_flashmla_kv_indices_triton": _CpuKvIndicesKernel()},
    )
    assert cls.batch_invariant_max_seqlen_k == bound
    assert cls.rebound_methods == sglang_backend.EXPECTED_REBOUND_METHODS
    backend, kv = _cpu_backend(cls, heads=heads, draft_tokens=None, max_context=bound, seed=3)
    layer = types.SimpleNamespace(
        tp_q_head_num=heads, head_dim=576, v_head_dim=512, scaling=scale, layer_id=0, k_scale=None
    )
    q_all = torch.randn(8, heads * 576, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    target_len, target_pool = 200, 2
    results = []
    for lens, pools in (
        ([200], [2]),
        ([5, 200, 130, 64], [0, 2, 5, 7]),
        ([256, 1, 70, 129, 3, 200], [1, 3, 4, 6, 0, 2]),
    ):
        assert lens[pools.index(target_pool)] == target_len  # the same request: its pool slot and length
        q = q_all[pools]
        out = _decode_batch(backend, lens, pools, q, layer, graph_buffers)
        meta = backend.forward_metadata
        ref = flashmla_ops.get_mla_metadata(
            torch.tensor(lens, dtype=torch.int32), heads, 1, batch_invariant=True, max_seqlen_k=bound
        )
        assert torch.equal(meta.flashmla_metadata, ref[0]) and torch.equal(meta.num_splits, ref[1])
        results.append(out[pools.index(target_pool)])
        expected = _oracle(q.view(len(lens), 1, heads, 576), kv, meta.block_kv_indices, lens, scale)
        torch.testing.assert_close(out.double(), expected.reshape(len(lens), -1), atol=1e-2, rtol=1e-2)
    for other in results[1:]:
        assert torch.equal(other, results[0])


def test_real_deterministic_backend_cuda_graph_buffer_for_a_long_context(flashmla_backend_module, caplog):
    """A context above 8,192 tokens: the batch-invariant metadata outgrows SGLang's [SM count, 8] buffer and
    its row count follows the batch size. In the buffer the class sizes (emulated here: SGLang's
    init_cuda_graph_state allocates on CUDA), SGLang's own capture / replay refresh fits every batch size
    and logs no capture / replay mismatch when consecutive replays have different sizes."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    heads, bound, max_bs = 16, 163_840, 8
    cls = sglang_backend.build_backend_class(
        flashmla_backend_module.FlashMLABackend,
        max_seqlen_k=bound,
        _extra_globals={"create_flashmla_kv_indices_triton": _CpuKvIndicesKernel()},
    )
    backend, _ = _cpu_backend(cls, heads=heads, draft_tokens=None, max_context=256, seed=5)
    rows = {bs: backend.batch_invariant_metadata_rows(bs) for bs in range(1, max_bs + 1)}
    # 163,840 tokens = 2,560 blocks, cut into 128 chunks (16 heads): 64 rows a request from 3 requests on
    assert rows[1] == 132 and rows[3] == 192 and rows[max_bs] == 512
    backend.cuda_graph_mla_metadata = torch.empty(rows[max_bs], 8, dtype=torch.int32)
    logger_name = flashmla_backend_module.__name__
    with caplog.at_level(logging.WARNING, logger=logger_name):
        for bs in (max_bs, 3, 1, max_bs, 5):
            seq_lens = torch.tensor([100, 2, 256, 64, 130, 7, 200, 1][:bs])
            batch = types.SimpleNamespace(
                batch_size=bs,
                seq_lens=seq_lens,
                seq_lens_cpu=None,  # replay: no CPU mirror
                req_pool_indices=torch.arange(bs),
                forward_mode=ForwardMode.DECODE,
                kv_loc_plan=None,
                out_cache_loc=None,
            )
            backend.init_forward_metadata_out_graph(batch)
            meta = backend.forward_metadata
            ref = flashmla_ops.get_mla_metadata(
                seq_lens.int(), heads, 1, batch_invariant=True, max_seqlen_k=bound
            )
            assert meta.flashmla_metadata.shape[0] == rows[bs] == ref[0].shape[0]
            assert torch.equal(meta.flashmla_metadata, ref[0]) and torch.equal(meta.num_splits, ref[1])
    assert not [r for r in caplog.records if "mismatch" in r.getMessage()], caplog.text
