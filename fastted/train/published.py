"""The papers' hyperparameters, by name: what ``published: <name>`` in a config sets.

Each entry is a set of dotted config keys, applied over the preset and under
the user's own file and overrides (so any of them can still be changed), with
the source it was read from. Each method's values go to its own section,
``distil.<method>``: the TED paper's scripts weigh the KL and MSE terms
differently for TED, LWD and KD on the same task; shared keys that one method
alone takes go to ``distil.per_method``.

What carries over, and what does not: the TED entries are the weights that
the authors' scripts use to distil DeBERTaV3-base into DeBERTaV3-xsmall (both
12 layers; TED's filters every layer, 768 wide, which is what fastted's
defaults give for that pair: one filter per student layer, the teacher's
width). Their ``mse_alpha`` is on the scale of those models' hidden states;
for other models ``distil.ted.normalize_mse`` (and LWD's) makes the MSE relative to the
targets' mean square, so that a weight means the same across models (then
tune it again: the published values assume the raw MSE).
"""

from __future__ import annotations

from typing import Any

# GLUE training-set sizes, for the scripts' warmup steps as a ratio of the run's steps.
_GLUE_TRAIN = {
    "mnli": 392_702,
    "qqp": 363_846,
    "qnli": 104_743,
    "sst2": 67_349,
    "rte": 2_490,
    "cola": 8_551,
    "mrpc": 3_668,
    "stsb": 5_749,
}

# cliang1453/task-aware-distillation, scripts/{ted,lwd,kd}_glue.sh (commit 1cd33d0): per task the batch size,
# learning rate, epochs, warmup steps, max length, and (kl_alpha, mse_alpha) of TED, LWD and KD. All three at
# the scripts' default temperature and weight decay 0; the comments give the GLUE dev scores the scripts report.
_TED_GLUE = {
    # task: (batch, lr, epochs, warmup steps, max length, TED (kl, mse), LWD (kl, mse), KD kl)
    "mnli": (64, 7e-5, 3, 1500, 256, (5, 7500), (5, 100), 5),  # acc TED 88.8, LWD 88.4, KD 88.5
    "qqp": (64, 6e-5, 8, 5000, 256, (20, 1000), (20, 20), 20),  # acc TED 92.2, LWD 91.8, KD 91.8
    "qnli": (32, 5e-5, 3, 500, 256, (20, 100), (20, 10), 20),  # acc TED 93.1, LWD 92.9, KD 92.8
    "sst2": (32, 4e-5, 6, 0, 256, (20, 20), (20, 20), 20),  # acc TED 94.4, LWD 94.3, KD 94.0
    "rte": (16, 6e-5, 6, 0, 256, (20, 50), (20, 20), 20),  # acc TED 83.0, LWD 80.8, KD 80.1
    "cola": (32, 6e-5, 6, 0, 256, (0, 10), (0, 5), 20),  # mcc TED 68.3, LWD 65.8, KD 64.6
    "mrpc": (32, 7e-5, 6, 0, 256, (20, 100), (20, 5), 20),  # acc TED 91.7, LWD 90.9, KD 91.2
    "stsb": (16, 1e-4, 6, 100, 128, (20, 50), (20, 5), 20),  # spearman TED 91.1, LWD 90.6, KD 90.7
}


# cliang1453/task-aware-distillation, scripts/learn_filters_glue.sh (commit 1cd33d0): TED's stage I per task, each
# model at its own fine-tuning learning rate (scripts/finetune_glue.sh's) and batch size, with its warmup steps;
# the filters of every layer (interval 1, fastted's default for two 12-layer models), the model frozen but in
# training mode (its dropout on), except on RTE, where the script turns the model's dropout off. The script sets
# no weight decay and no gradient clipping. Not carried over: CoLA's student head without dropout
# (filters.head_dropout holds for both models).
_TED_STAGE1 = {
    # task: (epochs, teacher (batch, lr, warmup steps), student (batch, lr, warmup steps), model dropout)
    "mnli": (3, (64, 2e-5, 1500), (64, 7e-5, 1500), True),
    "qqp": (8, (64, 2e-5, 5000), (64, 6e-5, 5000), True),
    "qnli": (3, (32, 1e-5, 500), (32, 5e-5, 500), True),
    "sst2": (6, (32, 2e-5, 0), (32, 4e-5, 0), True),
    "rte": (6, (16, 3e-5, 0), (32, 6e-5, 0), False),
    "cola": (6, (32, 2e-5, 100), (32, 6e-5, 0), True),
    "mrpc": (6, (32, 3e-5, 0), (32, 7e-5, 0), True),
    "stsb": (6, (16, 2e-5, 100), (16, 1e-4, 100), True),
}


def _stage1(task: str) -> dict[str, Any]:
    epochs, teacher, student, dropout = _TED_STAGE1[task]
    out: dict[str, Any] = {
        "filters.dropout": dropout,
        "filters.head_dropout": 0.1 if dropout else 0.0,
        "filters.train.epochs": float(epochs),
        "filters.train.weight_decay": 0.0,
        "filters.train.clip": 0.0,
        "filters.train.decay": "linear",
    }
    for which, (batch, lr, warmup) in (("teacher", teacher), ("student", student)):
        steps = epochs * -(-_GLUE_TRAIN[task] // batch)
        out[f"filters.per_model.{which}.batch_size"] = batch
        out[f"filters.per_model.{which}.lr"] = lr
        out[f"filters.per_model.{which}.warmup_ratio"] = round(warmup / steps, 4)
    return out


def _ted_glue(task: str) -> dict[str, Any]:
    batch, lr, epochs, warmup, max_length, ted, lwd, kd = _TED_GLUE[task]
    steps = epochs * -(-_GLUE_TRAIN[task] // batch)
    return {
        **_stage1(task),
        "data.max_length": max_length,
        "distil.ted.temperature": 2.0,
        "distil.lwd.temperature": 2.0,
        "distil.kd.temperature": 2.0,
        "distil.train.batch_size": batch,
        "distil.train.lr": lr,
        "distil.train.epochs": float(epochs),
        "distil.train.warmup_ratio": round(warmup / steps, 4),
        "distil.train.weight_decay": 0.0,
        "distil.ted.kl_alpha": ted[0],
        "distil.ted.mse_alpha": ted[1],
        "distil.lwd.kl_alpha": lwd[0],
        "distil.lwd.mse_alpha": lwd[1],
        "distil.lwd.project_equal_width": True,  # the scripts' LWD trains a projection on the student always
        "distil.kd.kl_alpha": kd,
    }


PUBLISHED: dict[str, dict[str, Any]] = {f"ted-glue-{task}": _ted_glue(task) for task in _TED_GLUE}

# DWT (Lee et al., 2023, distillation from a weaker teacher): the KL weight starts high (4) and decays to 1 over
# training, and the larger student starts from random weights (the paper found remapping the teacher's
# parameters into it hurts). The decay's shape is fastted's default (cosine); the paper names the end points.
PUBLISHED["dwt-paper"] = {
    "distil.dwt.alpha_h": 1.0,
    "distil.dwt.alpha_s": 4.0,
    "distil.dwt.alpha_s_end": 1.0,
    "distil.dwt.remap": False,
}

# RAIL-KD (Haidar et al., Findings of NAACL 2022, equation 4): the task, KL and random intermediate-layer losses
# weighted by lambdas that sum to 1, the teacher layers drawn again each epoch. The paper's per-task lambdas are
# not reproduced here: equal thirds.
PUBLISHED["railkd-paper"] = {
    "distil.railkd.task_alpha": 1 / 3,
    "distil.railkd.kd_alpha": 1 / 3,
    "distil.railkd.rail_alpha": 1 / 3,
    "distil.railkd.per": "epoch",
}

# CoDIR (Sun et al., EMNLP 2020), fine-tuning, from the authors' code (intersun/CoDIR, commit bb225c5):
# run_glue_script.py (T 2, kd_weight 0.5 with the task term at 1 - 0.5, nce_k 100 negatives, 10 epochs, weight
# decay 0.1, warmup 6 % of the updates), fairseq/options.py add_crd_args (a 128-wide projection) and
# fairseq/criterions/sentence_prediction_crd.py (each mapped layer's first token, [CLS], concatenated; negatives
# drawn from the examples of the other classes; a memory of one entry per training example, momentum 0.5 and
# temperature 0.07 in crd/memory.py). Not carried over: the contrastive weight, which the script takes from the
# command line with no value recorded (fastted's distil.codir.crd_alpha stays), the per-task learning rates and batch
# sizes, searched per task, and the loss itself: the code's is CRD's NCE over two memories (student's and
# teacher's), fastted's an InfoNCE of the student against the teacher's memory. The memory starts empty here
# (there: random vectors), so the first epoch draws from the examples seen so far.
PUBLISHED["codir-paper"] = {
    "distil.codir.kd_temperature": 2.0,
    "distil.codir.task_alpha": 0.5,
    "distil.codir.kd_alpha": 0.5,
    "distil.codir.proj_dim": 128,
    "distil.codir.temperature": 0.07,
    "distil.codir.negatives": 100,
    "distil.codir.bank_mode": "momentum",
    "distil.codir.pooling": "first",
    "distil.per_method.codir.train": {"epochs": 10.0, "weight_decay": 0.1, "warmup_ratio": 0.06},
}

SOURCES = {
    **{f"ted-glue-{task}": "cliang1453/task-aware-distillation scripts/{ted,lwd,kd}_glue.sh" for task in _TED_GLUE},
    "dwt-paper": "Lee et al. 2023 (DWT), the alpha_s schedule and random initialization",
    "railkd-paper": "Haidar et al. 2022 (RAIL-KD), equation 4 and the per-epoch draw",
    "codir-paper": "intersun/CoDIR run_glue_script.py, fairseq/options.py, sentence_prediction_crd.py, crd/",
}
