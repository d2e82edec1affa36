"""Every input check raises FlashMLAInputError (a RuntimeError and a ValueError) with its exact message.

Each check is exercised through torch.ops.flashmla.* (the CPU kernels, or the fake when a tensor is on the
meta device), through FakeTensorMode and through the public API. The expected texts are literal: the C++
launcher must produce the same strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _helpers import D_V, make_inputs, schedule_args
from torch._subclasses.fake_tensor import FakeTensorMode

import flashmla_ops
from flashmla_ops import _validation
from flashmla_ops._validation import FlashMLAInputError

SCALE = 576**-0.5
OUT_ARGS = ("out", "lse")
WORKSPACE_NUMEL = 2 * 8 * 1 * 32 * 513


def base() -> dict:
    """Valid arguments: b=2, s_q=2, h_q=16, h_kv=1, bf16, 8 scheduler parts."""
    inp = make_inputs([70, 5], s_q=2, h_q=16, h_kv=1, poison=False)
    meta, num_splits = schedule_args(inp, 8)
    return {
        "q": inp.q,
        "k_cache": inp.k_cache,
        "block_table": inp.block_table,
        "cache_seqlens": inp.cache_seqlens,
        "head_dim_v": D_V,
        "tile_scheduler_metadata": meta,
        "num_splits": num_splits,
        "out": torch.zeros(2, 2, 16, D_V, dtype=torch.bfloat16),
        "lse": torch.zeros(2, 16, 2),
        # exactly workspace_size: 2 * 8 parts * 1 kv head * 32 rows * 513
        "workspace": torch.zeros(WORKSPACE_NUMEL),
    }


def strided_last(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, stride(-1) == 2."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    return wide[..., ::2].copy_(t)


def setter(**changes: Callable[[dict], object]) -> Callable[[dict], None]:
    def apply(d: dict) -> None:
        for key, fn in changes.items():
            d[key] = fn(d)

    return apply


# (id, mutation of base(), exact message)
DECODE_CASES = [
    ("q-dtype", setter(q=lambda d: d["q"].float()), "flashmla: q must be bfloat16 or float16, got float32"),
    (
        "k_cache-dtype",
        setter(k_cache=lambda d: d["k_cache"].half()),
        "flashmla: k_cache must have the same dtype as q (bfloat16), got float16",
    ),
    (
        "block_table-int64",
        setter(block_table=lambda d: d["block_table"].long()),
        "flashmla: block_table must be int32, got int64",
    ),
    (
        "cache_seqlens-int64",
        setter(cache_seqlens=lambda d: d["cache_seqlens"].long()),
        "flashmla: cache_seqlens must be int32, got int64",
    ),
    (
        "metadata-int64",
        setter(tile_scheduler_metadata=lambda d: d["tile_scheduler_metadata"].long()),
        "flashmla: tile_scheduler_metadata must be int32, got int64",
    ),
    (
        "num_splits-uint8",
        setter(num_splits=lambda d: d["num_splits"].to(torch.uint8)),
        "flashmla: num_splits must be int32, got uint8",
    ),
    (
        "q-3d",
        setter(q=lambda d: d["q"][:, 0]),
        "flashmla: q must be a 4-D tensor [b, s_q, h_q, 576], got shape [2, 16, 576]",
    ),
    (
        "k_cache-5d",
        setter(k_cache=lambda d: d["k_cache"][None]),
        "flashmla: k_cache must be a 4-D tensor [num_pages, 64, h_kv, 576], got shape [1, 5, 64, 1, 576]",
    ),
    (
        "q-head-dim",
        setter(q=lambda d: d["q"][..., :512]),
        "flashmla: q must have head dim (size(-1)) 576, got 512",
    ),
    (
        "k_cache-head-dim",
        setter(k_cache=lambda d: torch.zeros(5, 64, 1, 512, dtype=torch.bfloat16)),
        "flashmla: k_cache must have head dim (size(-1)) 576, got 512",
    ),
    ("head_dim_v", setter(head_dim_v=lambda d: 576), "flashmla: head_dim_v must be 512, got 576"),
    (
        "page-size",
        setter(k_cache=lambda d: d["k_cache"][:, :32]),
        "flashmla: k_cache page size (size(1)) must be 64, got 32",
    ),
    (
        "heads-not-divisible",
        setter(k_cache=lambda d: torch.zeros(5, 64, 3, 576, dtype=torch.bfloat16)),
        "flashmla: the number of query heads (16) must be a positive multiple of h_kv (3)",
    ),
    (
        "zero-kv-heads",
        setter(k_cache=lambda d: d["k_cache"][:, :, :0]),
        "flashmla: the number of query heads (16) must be a positive multiple of h_kv (0)",
    ),
    (
        "zero-q-heads",
        setter(q=lambda d: d["q"][:, :, :0]),
        "flashmla: the number of query heads (0) must be a positive multiple of h_kv (1)",
    ),
    (
        "zero-s_q",
        setter(q=lambda d: d["q"][:, :0]),
        "flashmla: q must have at least one query token per request (s_q >= 1), got shape [2, 0, 16, 576]",
    ),
    (
        "batch-0",
        setter(
            q=lambda d: d["q"][:0],
            block_table=lambda d: d["block_table"][:0],
            cache_seqlens=lambda d: d["cache_seqlens"][:0],
            num_splits=lambda d: d["num_splits"][:1],
        ),
        "flashmla: batch size must be positive, got 0",
    ),
    (
        "block_table-batch",
        setter(block_table=lambda d: d["block_table"][:1]),
        "flashmla: block_table has batch size 1, but q has batch size 2",
    ),
    (
        "block_table-1d",
        setter(block_table=lambda d: d["block_table"][0]),
        "flashmla: block_table must be a 2-D tensor [b, max_blocks_per_seq], got shape [4]",
    ),
    (
        "block_table-no-columns",
        setter(block_table=lambda d: d["block_table"][:, :0]),
        "flashmla: block_table must have at least one column, got shape [2, 0]",
    ),
    (
        "cache_seqlens-2d",
        setter(cache_seqlens=lambda d: d["cache_seqlens"][:, None]),
        "flashmla: cache_seqlens must be a 1-D tensor [b], got shape [2, 1]",
    ),
    (
        "cache_seqlens-batch",
        setter(cache_seqlens=lambda d: torch.tensor([70, 5, 1], dtype=torch.int32)),
        "flashmla: cache_seqlens has batch size 3, but q has batch size 2",
    ),
    (
        "cache_seqlens-not-contiguous",
        setter(cache_seqlens=lambda d: torch.tensor([70, 0, 5, 0], dtype=torch.int32)[::2]),
        "flashmla: cache_seqlens must be contiguous, got shape [2] and strides [2]",
    ),
    (
        "metadata-width",
        setter(tile_scheduler_metadata=lambda d: d["tile_scheduler_metadata"][:, :7]),
        "flashmla: tile_scheduler_metadata must have shape [num_sm_parts >= 1, 8], got [8, 7]",
    ),
    (
        "metadata-no-parts",
        setter(tile_scheduler_metadata=lambda d: d["tile_scheduler_metadata"][:0]),
        "flashmla: tile_scheduler_metadata must have shape [num_sm_parts >= 1, 8], got [0, 8]",
    ),
    (
        "metadata-1d",
        setter(tile_scheduler_metadata=lambda d: d["tile_scheduler_metadata"][0]),
        "flashmla: tile_scheduler_metadata must have shape [num_sm_parts >= 1, 8], got [8]",
    ),
    (
        "num_splits-shape",
        setter(num_splits=lambda d: d["num_splits"][:2]),
        "flashmla: num_splits has 2 entries: the metadata was computed for batch size 1, but q has "
        "batch size 2; call get_mla_metadata with this batch's cache_seqlens",
    ),
    (
        "num_splits-2d",
        setter(num_splits=lambda d: d["num_splits"][None]),
        "flashmla: num_splits must have shape [3], got [1, 3]",
    ),
    (
        "k_cache-device",
        setter(k_cache=lambda d: d["k_cache"].to("meta")),
        "flashmla: k_cache must be on the same device as q (cpu), got meta",
    ),
    (
        "block_table-device",
        setter(block_table=lambda d: d["block_table"].to("meta")),
        "flashmla: block_table must be on the same device as q (cpu), got meta",
    ),
    (
        "cache_seqlens-device",
        setter(cache_seqlens=lambda d: d["cache_seqlens"].to("meta")),
        "flashmla: cache_seqlens must be on the same device as q (cpu), got meta",
    ),
    (
        "metadata-device",
        setter(tile_scheduler_metadata=lambda d: d["tile_scheduler_metadata"].to("meta")),
        "flashmla: tile_scheduler_metadata must be on the same device as q (cpu), got meta",
    ),
    (
        "num_splits-device",
        setter(num_splits=lambda d: d["num_splits"].to("meta")),
        "flashmla: num_splits must be on the same device as q (cpu), got meta",
    ),
    (
        "q-last-dim",
        setter(q=lambda d: strided_last(d["q"])),
        "flashmla: q must have a contiguous last dimension, got strides [36864, 18432, 1152, 2]",
    ),
    (
        "k_cache-last-dim",
        setter(k_cache=lambda d: strided_last(d["k_cache"])),
        "flashmla: k_cache must have a contiguous last dimension, got strides [73728, 1152, 1152, 2]",
    ),
    (
        "block_table-last-dim",
        setter(block_table=lambda d: strided_last(d["block_table"])),
        "flashmla: block_table must have a contiguous last dimension, got strides [8, 2]",
    ),
    (
        "metadata-not-contiguous",
        setter(tile_scheduler_metadata=lambda d: d["tile_scheduler_metadata"].t().contiguous().t()),
        "flashmla: tile_scheduler_metadata must be contiguous, got shape [8, 8] and strides [1, 8]",
    ),
    (
        "num_splits-not-contiguous",
        setter(num_splits=lambda d: torch.zeros(6, dtype=torch.int32)[::2]),
        "flashmla: num_splits must be contiguous, got shape [3] and strides [2]",
    ),
]

OUT_CASES = [
    (
        "out-dtype",
        setter(out=lambda d: d["out"].float()),
        "flashmla: out must have the same dtype as q (bfloat16), got float32",
    ),
    (
        "out-shape",
        setter(out=lambda d: torch.zeros(2, 2, 16, 576, dtype=torch.bfloat16)),
        "flashmla: out must have shape [2, 2, 16, 512], got [2, 2, 16, 576]",
    ),
    (
        "out-3d",
        setter(out=lambda d: d["out"][0]),
        "flashmla: out must have shape [2, 2, 16, 512], got [2, 16, 512]",
    ),
    (
        "out-last-dim",
        setter(out=lambda d: strided_last(d["out"])),
        "flashmla: out must have a contiguous last dimension, got strides [32768, 16384, 1024, 2]",
    ),
    ("lse-dtype", setter(lse=lambda d: d["lse"].bfloat16()), "flashmla: lse must be float32, got bfloat16"),
    (
        "lse-shape",
        setter(lse=lambda d: torch.zeros(2, 2, 16)),
        "flashmla: lse must have shape [2, 16, 2], got [2, 2, 16]",
    ),
    (
        "out-device",
        setter(out=lambda d: d["out"].to("meta")),
        "flashmla: out must be on the same device as q (cpu), got meta",
    ),
    (
        "lse-device",
        setter(lse=lambda d: d["lse"].to("meta")),
        "flashmla: lse must be on the same device as q (cpu), got meta",
    ),
    (
        "workspace-dtype",
        setter(workspace=lambda d: d["workspace"].bfloat16()),
        "flashmla: workspace must be float32, got bfloat16",
    ),
    (
        "workspace-size",
        setter(workspace=lambda d: d["workspace"][1:]),
        f"flashmla: workspace must have at least {WORKSPACE_NUMEL} elements (2 * num_sm_parts * h_kv * s_q * "
        f"(h_q / h_kv) * 513), got {WORKSPACE_NUMEL - 1}",
    ),
    (
        "workspace-device",
        setter(workspace=lambda d: d["workspace"].to("meta")),
        "flashmla: workspace must be on the same device as q (cpu), got meta",
    ),
    (
        "workspace-not-contiguous",
        setter(workspace=lambda d: torch.zeros(2 * WORKSPACE_NUMEL)[::2]),
        f"flashmla: workspace must be contiguous, got shape [{WORKSPACE_NUMEL}] and strides [2]",
    ),
]


def expect(fn: Callable[[], object], message: str) -> None:
    with pytest.raises(RuntimeError, match=re.escape(message)) as info:
        fn()
    assert isinstance(info.value, ValueError) and isinstance(info.value, FlashMLAInputError)
    assert str(info.value) == message


def _decode_positional(d: dict, with_out: bool) -> tuple:
    args = (
        d["q"],
        d["k_cache"],
        d["block_table"],
        d["cache_seqlens"],
        d["head_dim_v"],
        d["tile_scheduler_metadata"],
        d["num_splits"],
        SCALE,
        True,
    )
    return (*args, d["out"], d["lse"], d["workspace"]) if with_out else args


def _run_route(route: str, d: dict, with_out: bool) -> None:
    if route == "api":
        kwargs = {"out": d["out"], "lse": d["lse"], "workspace": d["workspace"]} if with_out else {}
        flashmla_ops.flash_mla_with_kvcache(*_decode_positional(d, False)[:7], SCALE, True, **kwargs)
        return
    op = torch.ops.flashmla.mla_decode_out if with_out else torch.ops.flashmla.mla_decode
    args = _decode_positional(d, with_out)
    if route == "op":
        op(*args)
        return
    with FakeTensorMode() as mode:  # route == "fake"
        op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


ROUTES = ["op", "fake", "api"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("with_out", [False, True], ids=["functional", "out"])
@pytest.mark.parametrize("mutate,message", [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_decode_input_errors(mutate, message, with_out, route):
    d = base()
    _run_route(route, d, with_out)  # valid inputs pass
    mutate(d)
    expect(lambda: _run_route(route, d, with_out), message)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("mutate,message", [c[1:] for c in OUT_CASES], ids=[c[0] for c in OUT_CASES])
def test_out_variant_input_errors(mutate, message, route):
    d = base()
    mutate(d)
    expect(lambda: _run_route(route, d, True), message)


@pytest.mark.parametrize("given", OUT_ARGS)
def test_api_out_and_lse_together(given):
    d = base()
    args = _decode_positional(d, False)[:7]
    expect(
        lambda: flashmla_ops.flash_mla_with_kvcache(*args, **{given: d[given]}),
        "flashmla: out and lse must be given together (both or neither)",
    )


def test_api_workspace_needs_out():
    d = base()
    args = _decode_positional(d, False)[:7]
    expect(
        lambda: flashmla_ops.flash_mla_with_kvcache(*args, workspace=d["workspace"]),
        "flashmla: workspace is used by the out-variant only: give out and lse with it",
    )


def test_workspace_size_matches_the_check():
    d = base()
    need = flashmla_ops.workspace_size(d["tile_scheduler_metadata"], 2 * 16, 1)
    assert need == WORKSPACE_NUMEL
    with pytest.raises(FlashMLAInputError, match="num_heads_k must be >= 1, got 0"):
        flashmla_ops.workspace_size(d["tile_scheduler_metadata"], 32, 0)


# ---- get_mla_metadata ------------------------------------------------------------------------------------
GOOD_SEQLENS = torch.tensor([70, 5], dtype=torch.int32)
METADATA_CASES = [
    # (id, cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_sm_parts, message)
    ("int64", GOOD_SEQLENS.long(), 32, 1, 4, "flashmla: cache_seqlens must be int32, got int64"),
    (
        "2d",
        GOOD_SEQLENS[None],
        32,
        1,
        4,
        "flashmla: cache_seqlens must be a 1-D tensor [b], got shape [1, 2]",
    ),
    ("empty", GOOD_SEQLENS[:0], 32, 1, 4, "flashmla: batch size must be positive, got 0"),
    (
        "not-contiguous",
        torch.tensor([70, 0, 5, 0], dtype=torch.int32)[::2],
        32,
        1,
        4,
        "flashmla: cache_seqlens must be contiguous, got shape [2] and strides [2]",
    ),
    ("tokens-0", GOOD_SEQLENS, 0, 1, 4, "flashmla: num_q_tokens_per_head_k must be >= 1, got 0"),
    ("heads-0", GOOD_SEQLENS, 32, 0, 4, "flashmla: num_heads_k must be >= 1, got 0"),
    ("heads-negative", GOOD_SEQLENS, 32, -2, 4, "flashmla: num_heads_k must be >= 1, got -2"),
    ("parts-0", GOOD_SEQLENS, 32, 1, 0, "flashmla: num_sm_parts must be >= 1, got 0"),
]


METADATA_PARAMS = [
    pytest.param(route, *case[1:], id=f"{case[0]}-{route}")
    for case in METADATA_CASES
    for route in ROUTES
    if not (route == "api" and case[4] != 4)  # num_sm_parts is not an argument of the public API
]


@pytest.mark.parametrize("route,seqlens,tokens,heads,parts,message", METADATA_PARAMS)
def test_get_mla_metadata_input_errors(route, seqlens, tokens, heads, parts, message):
    if route == "api":
        expect(lambda: flashmla_ops.get_mla_metadata(seqlens, tokens, heads), message)
    elif route == "op":
        expect(lambda: torch.ops.flashmla.get_mla_metadata(seqlens, tokens, heads, parts), message)
    else:
        with FakeTensorMode() as mode:
            fake = mode.from_tensor(seqlens)
            expect(lambda: torch.ops.flashmla.get_mla_metadata(fake, tokens, heads, parts), message)


def test_message_constants():
    """Every template starts with the prefix and is a format string the C++ side can mirror."""
    names = [n for n in dir(_validation) if n.startswith("MSG_")]
    assert len(names) >= 20
    for n in names:
        template = getattr(_validation, n)
        assert isinstance(template, str) and template.startswith("flashmla: "), n


def test_error_class():
    assert issubclass(FlashMLAInputError, ValueError) and issubclass(FlashMLAInputError, RuntimeError)
    assert flashmla_ops.FlashMLAInputError is FlashMLAInputError


def _cpp_string_text(path: Path) -> str:
    """The source with adjacent C++ string literals joined ("a " "b" -> "a b")."""
    return re.sub(r'"\s*\n\s*"', "", path.read_text())


@pytest.mark.parametrize(
    "name",
    [
        "MSG_KV_FP8_DTYPE",
        "MSG_KV_PER_TENSOR_DIM",
        "MSG_KV_V32_DIM",
        "MSG_K_SCALE_MISSING",
        "MSG_K_SCALE_V32",
        "MSG_K_SCALE_DTYPE",
    ],
)
def test_cuda_launcher_mirrors_the_fp8_messages(name):
    """The FP8 checks of csrc/api/mla_decode.cpp say what _validation says: every literal piece of the Python
    template (between its format fields) appears in the launcher's strings."""
    source = _cpp_string_text(Path(__file__).resolve().parent.parent / "csrc" / "api" / "mla_decode.cpp")
    template = getattr(_validation, name).removeprefix("flashmla: ")
    for piece in re.split(r"\{[a-z_]+\}", template):
        assert piece.strip() in source, (name, piece)
