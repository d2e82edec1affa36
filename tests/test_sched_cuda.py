"""The on-device scheduler (csrc/kernels/sched_meta.cu) gives exactly the CPU scheduler's records."""

from __future__ import annotations

import pytest
import torch
from _gpu import requires_hopper

import flashmla_ops
from flashmla_ops.reference import get_mla_metadata_reference

pytestmark = [requires_hopper, pytest.mark.gpu]


# 30000 > kSchedSmemRequests: the prefix sums go to the global scratch instead of shared memory.
@pytest.mark.parametrize("b", [1, 3, 64, 1000, 1025, 16384, 30000])
@pytest.mark.parametrize("num_sm_parts", [1, 7, 33, 66, 132])
def test_gpu_scheduler_equals_cpu(b, num_sm_parts):
    gen = torch.Generator().manual_seed(b * 1000 + num_sm_parts)
    for trial in range(3):
        kind = trial % 3
        if kind == 0:
            seqlens = torch.randint(0, 131073, (b,), generator=gen)
        elif kind == 1:
            seqlens = torch.randint(0, 300, (b,), generator=gen)
            seqlens[torch.rand(b, generator=gen) < 0.5] = 0
        else:
            seqlens = torch.full((b,), 8192)
        seqlens = seqlens.to(torch.int32)
        want = get_mla_metadata_reference(seqlens, 16, 1, num_sm_parts)
        got = torch.ops.flashmla.get_mla_metadata(seqlens.cuda(), 16, 1, num_sm_parts)
        assert torch.equal(got[0].cpu(), want[0]), f"trial {trial}: records differ"
        assert torch.equal(got[1].cpu(), want[1]), f"trial {trial}: num_splits differ"


def test_public_wrapper_uses_device_sm_count():
    seqlens = torch.full((4,), 1000, dtype=torch.int32, device="cuda")
    meta, num_splits = flashmla_ops.get_mla_metadata(seqlens, 128, 1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert meta.shape == (max(sms // 2, 1), 8)
    assert num_splits.shape == (5,)


def _edge_lengths(b: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    seqlens = torch.randint(-100, 20000, (b,), generator=gen)
    seqlens[::5] = 0
    seqlens[1::97] = 2**31 - 1  # 2^25 blocks: the cost sums need 64 bits
    return seqlens.to(torch.int32)


# 12288 / 12289: the last batch whose prefix sums fit in the kernel's shared memory and the first that uses
# the global scratch; 1500 and 2000 parts: the record pass runs over several chunks of 512 parts (a part's end
# is read from the next part's start, across the chunk boundary).
@pytest.mark.parametrize(("b", "num_sm_parts"), [(12288, 66), (12289, 66), (700, 1500), (3, 2000)])
def test_gpu_scheduler_edges(b, num_sm_parts):
    seqlens = _edge_lengths(b, b + num_sm_parts)
    want = get_mla_metadata_reference(seqlens, 16, 1, num_sm_parts)
    got = torch.ops.flashmla.get_mla_metadata(seqlens.cuda(), 16, 1, num_sm_parts)
    assert torch.equal(got[0].cpu(), want[0]), "records differ"
    assert torch.equal(got[1].cpu(), want[1]), "num_splits differ"


# Small batches of long requests on 64 parts (until v8.0 the bounds of a small-batch "parts budget": total
# 1024 and 1025 units, b * 16 = 64 against 80): every request is cut into many pieces.
@pytest.mark.parametrize(
    "seqlens",
    [[16064] * 4, [16064] * 3 + [16128], [15040] * 4, [11520] * 5],
    ids=["total_1024", "total_1025", "b4", "b5"],
)
def test_gpu_scheduler_small_batches(seqlens):
    sl = torch.tensor(seqlens, dtype=torch.int32)
    want = get_mla_metadata_reference(sl, 16, 1, 64)
    got = torch.ops.flashmla.get_mla_metadata(sl.cuda(), 16, 1, 64)
    assert torch.equal(got[0].cpu(), want[0]), "records differ"
    assert torch.equal(got[1].cpu(), want[1]), "num_splits differ"
