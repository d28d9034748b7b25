"""A short demo of the fused filtered MSE: a student learns a teacher's layers.

A frozen "teacher" (an embedding and 8 residual tanh layers of width 64) and a
trainable "student" (4 layers of width 32) read the same random token batches.
Every second teacher layer is mapped to a student layer (TED's interval rule);
frozen teacher filters project the teacher's states to the filter width, and
the student's filters and body learn to reproduce them through
``fastted.filtered_mse``. It prints the loss falling; on a CPU it takes a few
seconds. Run it with ``python -m fastted.demo`` (``--help`` for options).

The real distillation demo is the engine's: ``make demo`` (``python -m fastted pipeline``).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

import fastted


class TinyEncoder(nn.Module):
    """Embedding + residual tanh layers; returns every layer's hidden states."""

    def __init__(self, vocab: int, width: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, tokens):  # (B, T) -> list of depth tensors (B, T, width)
        h = self.embed(tokens)
        states = []
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
            states.append(h)
        return states


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastted.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--impl", default="auto", choices=fastted.ops.checks.IMPLS, help="loss path (default auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    vocab, batch, seq, d_t, d_s, d_f = 1000, 16, 64, 64, 32, 48
    teacher = TinyEncoder(vocab, d_t, depth=8).to(device).requires_grad_(False)
    teacher_filters = nn.ModuleList(nn.Linear(d_t, d_f) for _ in range(4)).to(device).requires_grad_(False)
    student = TinyEncoder(vocab, d_s, depth=4).to(device)
    student_filters = nn.ModuleList(nn.Linear(d_s, d_f) for _ in range(4)).to(device)
    params = list(student.parameters()) + list(student_filters.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    teacher_layers = [1, 3, 5, 7]  # (l + 1) % 2 == 0: TED's interval rule with interval 2

    print(
        f"fastted {fastted.__version__}: filtered MSE, 4 mapped layer pairs, "
        f"student width {d_s} -> filters {d_f} <- teacher width {d_t}, device {device.type}, impl {args.impl}"
    )
    first = last = None
    start = time.perf_counter()
    for step in range(args.steps + 1):
        tokens = torch.randint(0, vocab, (batch, seq), device=device)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), device=device)
        mask = torch.arange(seq, device=device)[None, :] < lengths[:, None]  # (B, T) padding mask
        with torch.no_grad():
            t_states = teacher(tokens)
        loss, layer_losses = fastted.filtered_mse(
            student(tokens),
            [f.weight for f in student_filters],
            [t_states[l] for l in teacher_layers],
            student_biases=[f.bias for f in student_filters],
            teacher_weights=[f.weight for f in teacher_filters],
            teacher_biases=[f.bias for f in teacher_filters],
            mask=mask,
            impl=args.impl,
            return_layer_losses=True,
        )
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            per_layer = " ".join(f"{x:.4f}" for x in layer_losses.tolist())
            print(f"step {step:4d}  loss {loss.item():.4f}  per layer [{per_layer}]", flush=True)
        first = loss.item() if first is None else first
        last = loss.item()
        if step == args.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    elapsed = time.perf_counter() - start
    print(f"loss fell from {first:.4f} to {last:.4f} ({first / last:.1f}x) in {args.steps} steps, {elapsed:.1f} s")
    if not last < first:
        print("error: the loss did not fall", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
