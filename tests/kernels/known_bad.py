"""Defects the compile tier must catch, compiled for sm_90 by its own machinery (see test_compile_tier.py).

Each is a launch this project once made, or the smallest kernel showing the
defect: the checks that pass on today's kernels are seen failing here. The
tier's writer (``python -m fastted.kernels.resources --write``) records
``verdicts()`` in the committed table, and this file's text is in the table's
stamp; alone:

    TRITON_INTERPRET=0 python tests/kernels/known_bad.py --out known_bad.json
"""

import argparse
import json
from unittest import mock

import torch
import triton
import triton.language as tl

from fastted.kernels import ARCHS, contrastive_kd, filtered_mse, launch, recording
from fastted.kernels import resources as tier


@triton.jit
def int32_product_kernel(x_ptr, out_ptr, stride, N, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + rows * stride, mask=rows < N)  # rows * stride in 32 bits
    tl.store(out_ptr + rows, x, mask=rows < N)


@triton.jit
def int64_product_kernel(x_ptr, out_ptr, stride, N, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK).to(tl.int64)
    x = tl.load(x_ptr + rows * stride, mask=rows < N)
    tl.store(out_ptr + rows, x, mask=rows < N)


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _contrastive_old_blocks():
    old = dict(BLOCK_B=16, BLOCK_K=32, BLOCK_D=1024, num_warps=8, num_stages=3)  # the rule before element sizes
    with mock.patch.object(contrastive_kd, "_blocks", lambda *args: old):
        yield lambda: contrastive_kd.contrastive_forward(
            _meta(64, 768),
            _meta(64, 768),
            _meta(4096, 768),
            _meta(64),
            labels=None,
            negative_labels=None,
            temperature=0.07,
            eps=1e-12,
            grad_s=True,
            grad_t=True,
        )


def _filtered_mse_large_fp32_tile():
    # 128 x 256 tiles, as fp32 once had
    large = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3)
    with mock.patch.object(filtered_mse, "configs_for", lambda *args: [large]):
        yield lambda: filtered_mse.filtered_mse_forward(
            [_meta(4096, 384)],
            [_meta(384, 384)],
            [_meta(384)],
            [_meta(4096, 768)],
            [_meta(384, 768)],
            [_meta(384)],
            None,
            _meta(4096),
            _meta(1),
            _meta(1),
            write_grad=True,
            write_colsum=True,
        )


def _product(kernel):
    def case():
        yield lambda: launch(kernel, (1,), _meta(4096), _meta(64), 4096, 64, BLOCK=64)

    return case


# name -> a generator that yields the launch to record inside whatever it patches, then undoes it
CASES = {
    "contrastive fp32 bank, old blocks": _contrastive_old_blocks,
    "filtered_mse fp32, 128x256 tile": _filtered_mse_large_fp32_tile,
    "int32 stride product": _product(int32_product_kernel),
    "int64 stride product": _product(int64_product_kernel),
}
# name -> the words of the problem that must catch it (None: the sound twin, no problem at all)
CAUGHT_BY = {
    "contrastive fp32 bank, old blocks": "shared memory",
    "filtered_mse fp32, 128x256 tile": "spills",
    "int32 stride product": "32-bit products",
    "int64 stride product": None,
}


def verdicts() -> list[dict]:
    """Each case compiled for sm_90: its name, the checks' problems, its row of the table."""
    arch = ARCHS["sm_90"]
    rows = []
    for name, case in CASES.items():
        for run in case():  # inside the case's patches: the launch and the autotuner's pruning see them
            with recording(arch) as launches:
                run()
            launch_ = launches[0]  # the first launch is the one with the defect
            jit, entries = tier._unwrap(launch_, arch)
            config, kwargs = entries[0]
            variant = tier.Variant(
                jit.__name__,
                jit,
                launch_.args,
                kwargs,
                config,
                "float32",
                [dict(size=name)],
                [tier._grid(launch_, kwargs)],
            )
            row = tier.compile_variant(variant, arch)
            rows.append(dict(name=name, problems=tier.problems(row, arch), row=row))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.out, "w") as f:
        json.dump(dict(rows=verdicts()), f, indent=1)


if __name__ == "__main__":
    main()
