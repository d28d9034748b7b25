"""The installed wheel, used as a user of it would, from a directory outside the clone (scripts/wheel_check.sh).

Checks that fastted and fastted.kernels come from the environment's site-packages (not a source tree), that
the kernels' modules import, and one loss of each family (filtered MSE, logit KD, contrastive KD) against
its float64 spec with its gradient: on the CPU path, and with ``--interpret`` through the Triton kernel
under Triton's interpreter.
"""

import argparse
import os
import sys
import sysconfig
from pathlib import Path


def check_installed() -> None:
    import fastted
    import fastted.kernels

    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(fastted.__file__).resolve()
    assert where.is_relative_to(site), f"fastted imported from {where}, not from {site}"
    paths = [Path(p).resolve() for p in fastted.kernels.__path__]
    assert paths == [site / "fastted" / "kernels"], f"fastted.kernels searches {paths}"
    from fastted.kernels import contrastive_kd, filtered_mse, logit_kd, pooling, resources, runtime, sparse_logit_kd

    assert fastted.kernels.launch is runtime.launch
    for module in (contrastive_kd, filtered_mse, logit_kd, pooling, resources, sparse_logit_kd):
        assert Path(module.__file__).resolve().parent == site / "fastted" / "kernels", module.__file__
    print(f"wheel: fastted from {where.parent}")


def _compare(name, impl, run, spec, leaves) -> None:
    """run() and spec() each return a loss of the leaves; the losses and the leaves' gradients must agree."""
    import torch

    loss = run()
    grads = torch.autograd.grad(loss, leaves)
    wide = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = spec(*wide)
    ref_grads = torch.autograd.grad(ref, wide)
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-4 * (1 + abs(ref.item())), (name, loss, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g.double(), r, rtol=1e-4, atol=1e-6), (name, (g.double() - r).abs().max())
    print(f"wheel: {name} ({impl}) = {loss.item():.6f}, float64 spec {ref.item():.6f}, gradients agree")


def check_losses(impl: str) -> None:
    import torch

    import fastted
    from fastted import reference

    gen = torch.Generator().manual_seed(20261204)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(True)

    # The filtered MSE: two mapped layers of 37 tokens, student 24 wide, teacher 40, filters of 16.
    s = [rand(37, 24) for _ in range(2)]
    t = [torch.randn(37, 40, generator=gen) for _ in range(2)]
    w = [rand(16, 24, scale=0.2) for _ in range(2)]
    v = [torch.randn(16, 40, generator=gen) * 0.2 for _ in range(2)]
    mask = (torch.rand(37, generator=gen) > 0.3).float()
    _compare(
        "filtered_mse",
        impl,
        lambda: fastted.filtered_mse(s, w, t, teacher_weights=v, mask=mask, impl=impl),
        lambda s0, s1, w0, w1: reference.filtered_mse_reference(
            [s0, s1], [w0, w1], [x.double() for x in t], teacher_weights=[x.double() for x in v], mask=mask.double()
        )[0],
        s + w,
    )
    # Logit KD over a vocabulary of 301 for 19 rows.
    student, teacher = rand(19, 301, scale=3.0), torch.randn(19, 301, generator=gen) * 3.0
    _compare(
        "logit_kd",
        impl,
        lambda: fastted.logit_kd(student, teacher, temperature=2.0, impl=impl),
        lambda x: reference.logit_kd_reference(x, teacher.double(), temperature=2.0),
        [student],
    )
    # Contrastive KD: 7 anchors of 32 against 45 negatives.
    anchors, positives, negatives = rand(7, 32), torch.randn(7, 32, generator=gen), torch.randn(45, 32, generator=gen)
    _compare(
        "contrastive_kd",
        impl,
        lambda: fastted.contrastive_kd(anchors, positives, negatives, impl=impl),
        lambda x: reference.contrastive_kd_reference(x, positives.double(), negatives.double()),
        [anchors],
    )


def check_core_only() -> None:
    """The wheel's core install holds none of the engine's dependencies, and the losses imported none of them."""
    import importlib.util

    import fastted.integrations  # noqa: F401  (importable without transformers: the Trainer is built on first use)
    from fastted.extras import ENGINE_ONLY, HF

    installed = [name for name in {**HF, **ENGINE_ONLY} if importlib.util.find_spec(name) is not None]
    assert not installed, f"the core install holds {installed}: they belong to the train or hf extra"
    loaded = [name for name in [*HF, *ENGINE_ONLY, "fastted.train"] if name in sys.modules]
    assert not loaded, f"importing fastted and running its losses imported {loaded}"
    print("wheel: core install, no engine dependency installed or imported")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="the Triton kernels under Triton's interpreter")
    args = parser.parse_args()
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernel modules import it lazily
    check_installed()
    check_losses("triton" if args.interpret else "reference")
    check_core_only()
    return 0


if __name__ == "__main__":
    sys.exit(main())
