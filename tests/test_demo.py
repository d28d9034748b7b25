"""The README's main job: the demo trains and its loss falls."""

import re

from fastted import demo


def test_demo_loss_falls(capsys):
    assert demo.main(["--steps", "40", "--impl", "reference"]) == 0
    out = capsys.readouterr().out
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([0-9.]+)", out)]
    assert len(losses) >= 5, out
    assert losses[-1] < 0.8 * losses[0], out
