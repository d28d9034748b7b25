"""Triton kernels of fastted, installed as ``fastted.kernels``.

Each module holds the ``@triton.jit`` kernels of one loss and their launchers.
Nothing here is imported by ``import fastted``: the losses import a kernel
module the first time a Triton path is taken, so importing fastted never
touches CUDA and never compiles a kernel.
"""
