"""The launch seam and the host-side assumptions of the kernels: alignment, padded rows, recorded launches."""

import pytest
import torch

import fastted
from fastted.kernels import ARCHS, MAX_GRID, aligned_row_stride, device_arch, element_offsets, interpreting, recording


def test_element_offsets_asserts_the_alignment_the_kernels_assume():
    """The kernels tell the compiler every layer starts 16-byte aligned; a layer that does not is an error."""
    base = torch.zeros(4, 64, dtype=torch.bfloat16)
    offsets = element_offsets([base[0], base[2]], base[0], base.device)
    assert offsets.tolist() == [0, 128]
    with pytest.raises(ValueError, match=r"tensors \[1\].*16-byte aligned"):
        element_offsets([base[0], base[0, 1:]], base[0], base.device)


@pytest.mark.parametrize(
    "columns,dtype,stride",
    [
        (30522, torch.bfloat16, 30528),
        (50257, torch.float32, 50260),
        (128256, torch.bfloat16, 128256),
        (1003, torch.float16, 1008),
    ],
)
def test_aligned_row_stride(columns, dtype, stride):
    got = aligned_row_stride(columns, dtype)
    assert got == stride and got * torch.empty((), dtype=dtype).element_size() % 16 == 0


def test_recording_runs_the_launchers_without_launching():
    """Inside recording() the launchers run on meta tensors, see the recorded arch, and launch nothing."""
    from fastted.kernels.logit_kd import FORWARD_KL, logit_kd_forward

    meta = torch.device("meta")
    with recording(ARCHS["sm_80"]) as launches:
        assert not interpreting() and device_arch(meta) is ARCHS["sm_80"]
        s = torch.empty(2**20, 262144, dtype=torch.bfloat16, device=meta)  # 512 GiB: it exists only as a shape
        logit_kd_forward(
            s,
            s,
            torch.empty(2**20, device=meta),
            grad=s,
            temperature=2.0,
            divergence=FORWARD_KL.value,
            beta=0.5,
            soft_weight=1.0,
        )
    assert len(launches) == 1
    (launch,) = launches
    assert launch.grid == (2**20,) and all(g <= limit for g, limit in zip(launch.grid, MAX_GRID))
    assert launch.kwargs["BLOCK_V"] == 2048 and launch.kwargs["num_warps"] == 8  # the GPU's choice
    assert device_arch(torch.device("cpu")) is ARCHS["sm_90"]  # outside: the interpreter's stand-in


def test_fused_head_pads_its_logits_rows(monkeypatch):
    """On the Triton path the logits buffers' rows are padded to 16 bytes with -inf and the row kernel is
    told so; the result is the reference's."""
    from fastted.kernels import logit_kd as kernel

    seen = []
    real = kernel.logit_kd_forward

    def spy(s, t, *args, **kwargs):
        padding = t.as_strided(
            (t.shape[0], kwargs["padded_cols"] - t.shape[1]), (t.stride(0), 1), t.storage_offset() + t.shape[1]
        )
        seen.append((kwargs["padded_cols"], s.stride(0), bool((padding == float("-inf")).all())))
        return real(s, t, *args, **kwargs)

    monkeypatch.setattr(kernel, "logit_kd_forward", spy)
    g = torch.Generator().manual_seed(3)
    xs, xt = torch.randn(9, 16, generator=g), torch.randn(9, 24, generator=g)
    ws, wt = torch.randn(1003, 16, generator=g), torch.randn(1003, 24, generator=g)
    got = fastted.fused_linear_kd(xs, ws, xt, wt, impl="triton", chunk_size=4)
    assert seen and all(s == (1004, 1004, True) for s in seen)
    torch.testing.assert_close(got, fastted.fused_linear_kd(xs, ws, xt, wt, impl="reference"))
