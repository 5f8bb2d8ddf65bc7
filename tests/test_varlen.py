"""The variable-length attention path's pieces: packed offsets, the prefix gather, the
warm-up check of the kernel, and where the path is refused. Its scores against the reference
are in test_parity.py (``any_runner``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.attention import check_attention, check_varlen_kernel, flash_varlen, make_varlen, varlen_reference
from worker.runner import ModelRunner
from worker.types import Attention

CPU = torch.device("cpu")


def test_offsets_and_gather_put_each_rows_prefix_before_its_tokens() -> None:
    # rows: 3 new tokens after prefix group 0 (2 long), 2 without a prefix, 4 after group 1 (5 long)
    v = make_varlen([3, 2, 4], [2, 0, 5], [0, -1, 1], CPU)
    assert v.cu_q.tolist() == [0, 3, 5, 9] and v.cu_k.tolist() == [0, 5, 7, 16]
    assert v.cu_last.tolist() == [0, 1, 2, 3] and (v.max_q, v.max_k) == (4, 9)
    assert v.cu_q.dtype == v.cu_k.dtype == torch.int32  # what FlashAttention takes
    # sources: the 9 new tokens are 0..8, prefix 0 is 9..10, prefix 1 is 11..15
    assert v.key_gather is not None
    assert v.key_gather.tolist() == [9, 10, 0, 1, 2, 3, 4, 11, 12, 13, 14, 15, 5, 6, 7, 8]


def test_rows_sharing_a_prefix_read_the_same_source_keys() -> None:
    v = make_varlen([1, 2], [3, 3], [0, 0], CPU)
    assert v.key_gather is not None
    assert v.key_gather.tolist() == [3, 4, 5, 0, 3, 4, 5, 1, 2]


def test_without_prefixes_the_keys_are_the_tokens() -> None:
    v = make_varlen([4, 1], [0, 0], [-1, -1], CPU)
    assert v.key_gather is None and v.cu_k.tolist() == v.cu_q.tolist() == [0, 4, 5]


def test_the_reference_kernel_passes_the_warm_up_check_in_bf16() -> None:
    worst = check_varlen_kernel(varlen_reference, CPU, torch.bfloat16, heads=16, kv_heads=8, head_dim=128)
    assert 0 < worst < 0.05  # bf16 rounding shows, and stays small


def _top_left_causal(q, k, v, cu_q, cu_k, max_q, max_k):  # type: ignore[no-untyped-def]
    """Causal aligned to the start (PyTorch SDPA's is_causal): prefix keys mostly unseen."""
    outs = []
    for r in range(len(cu_q) - 1):
        qs = q[cu_q[r]:cu_q[r + 1]].transpose(0, 1)
        ks, vs = (t[cu_k[r]:cu_k[r + 1]].transpose(0, 1) for t in (k, v))
        seen = torch.ones(qs.shape[1], ks.shape[1], dtype=torch.bool).tril()
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seen, enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)


def _tiled_heads(q, k, v, cu_q, cu_k, max_q, max_k):  # type: ignore[no-untyped-def]
    """Query head h on K/V head h % kv_heads instead of h // group."""
    group = q.shape[1] // k.shape[1]
    return varlen_reference(q, k.repeat(1, group, 1), v.repeat(1, group, 1), cu_q, cu_k, max_q, max_k)


@pytest.mark.parametrize("wrong", [_top_left_causal, _tiled_heads])
def test_the_warm_up_check_refuses_a_kernel_that_means_something_else(wrong) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RuntimeError, match="use padded attention"):
        check_varlen_kernel(wrong, CPU, torch.bfloat16, heads=16, kv_heads=8, head_dim=128)


@pytest.mark.parametrize("attention,message", [("varlen", "needs a CUDA device"),
                                               ("flash", "one of padded, varlen, rows")])
def test_unservable_attention_choices_are_refused_before_loading(
    tiny_model_dir: Path, attention: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ModelRunner.load(str(tiny_model_dir), device="cpu", attention=attention)


def test_rows_attention_is_the_cpus_and_refused_elsewhere() -> None:
    """The row strategy calls the CPU's flash kernel directly: a GPU gets padded by default,
    and asking it for rows is refused with what to use instead."""
    assert Attention.for_device("cpu") is Attention.ROWS
    assert Attention.for_device("cuda") is Attention.PADDED
    with pytest.raises(ValueError, match="needs the CPU, not cuda; use padded attention"):
        check_attention("rows", torch.device("cuda"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention needs CUDA")
def test_flash_varlen_kernel_means_what_the_reference_means_on_this_gpu() -> None:
    worst = check_varlen_kernel(flash_varlen, torch.device("cuda"), torch.bfloat16, heads=16, kv_heads=8,
                                head_dim=128)
    assert worst < 0.05
