"""benchmarks/cache_scale.py's parts at its --quick sizes: a logits-only cache at k = 64 and 128,256 entries fits
256 bytes a token, the packed top-64's KL is within 1 % of the bf16 top-64's, a layer budget keeps a share f of
the tokens, a build's peak RSS is measured in its own process, and opening 1,000 shards hashes no shard byte."""

import pytest

from benchmarks.cache_scale import (
    BYTES_PER_TOKEN,
    KL_RELATIVE_ERROR,
    OPEN_SECONDS,
    PEAK_BYTES,
    QUICK,
    VOCAB,
    K,
    StubTeacher,
    cache_size,
    kl_errors,
    layer_budget,
    many_shards,
    open_cache,
    peak_rss,
    synthetic_logit_batches,
    token_examples,
)


def test_the_stub_teacher_gives_a_row_the_same_states_in_any_batch():
    from fastted.train.data import CLMCollator

    teacher = StubTeacher(97, head_width=8, layer_width=24)
    examples = token_examples(3, 7, seed=0, vocab=97)
    examples[1]["input_ids"] = examples[1]["input_ids"][:4]  # padded in the batch
    together = teacher(CLMCollator(0)(examples, None), [2, 0])
    alone = teacher(CLMCollator(0)(examples[1:2], None), [2, 0])
    for a, b in zip(together.hidden_states, alone.hidden_states):
        assert a[1, :4].equal(b[0]) and not a[1, 4:].any()
    assert not together.hidden_states[0].equal(together.hidden_states[1])  # each layer its own states
    assert together.head_input[1, :4].equal(alone.head_input[0])


def test_a_logits_only_cache_at_k64_and_128256_entries_fits_256_bytes_a_token(tmp_path):
    record = cache_size(str(tmp_path / "size"), QUICK["size_examples"], QUICK["size_length"])
    assert record["vocab"] == VOCAB and record["k"] == K and record["id_bits"] == 17
    assert record["bytes_per_token"]["logits"] == 212.0  # 136 bytes of ids, 64 of levels, 12 of top/step/tail
    assert record["bytes_per_token"]["total"] <= BYTES_PER_TOKEN and record["within_target"]


@pytest.mark.slow
def test_the_packed_top64s_kl_is_within_1_percent_of_the_bf16_top64s():
    rows = kl_errors("synthetic", synthetic_logit_batches(QUICK["kl_batches"], QUICK["kl_rows"]))
    assert {(r["temperature"]) for r in rows} == {1.0, 2.0} and len(rows) == 4
    for r in rows:
        assert r["rel_err_max"] <= KL_RELATIVE_ERROR and r["within_target"], r
        # The packed values are the nearer to the fp32 top-k: the difference is bf16's rounding.
        assert r["vs_fp32_rel_err_max"]["packed"] < r["vs_fp32_rel_err_max"]["bf16"], r
    small, large = rows[0]["kl_bf16_mean"], rows[1]["kl_bf16_mean"]
    assert 0.03 < small < 0.3 and 0.3 < large < 3  # the two noise scales: KL about 0.1 and about 1


def test_a_layer_budget_keeps_a_share_f_of_the_tokens(tmp_path):
    record = layer_budget(
        str(tmp_path), QUICK["layer_width"], 2, QUICK["layer_length"], layer_bytes=QUICK["layer_bytes"]
    )
    full = 4 * (QUICK["layer_width"] + 4)  # int8 rows and their fp32 scales, 4 layers
    assert record["fraction_f"] == pytest.approx(QUICK["layer_bytes"] / (full + 4))
    assert record["full_bytes_per_token"]["layers"] == full
    assert record["bytes_per_token"]["layers"] == pytest.approx(QUICK["layer_bytes"], rel=0.35)
    assert abs(record["kept_tokens_mean"] - record["fraction_f"] * QUICK["layer_length"]) <= 1
    for row in record["per_batch"]:
        assert row["mse_full_int8"] > 0 and row["mse_kept"] > 0 and abs(row["int8_vs_live_rel_err"]) < 0.5


@pytest.mark.slow
def test_a_builds_peak_rss_is_measured_in_its_own_process(tmp_path):
    record = peak_rss(
        str(tmp_path / "rss"), 2, QUICK["rss_length"], QUICK["layer_width"], QUICK["layer_bytes"], "builder"
    )
    assert record["tokens"] == 2 * QUICK["rss_length"] and record["shards"] == 1
    assert record["before_build"]["VmHWM_bytes"] <= record["peak_rss_bytes"] < PEAK_BYTES
    assert not (tmp_path / "rss").exists()


@pytest.mark.slow
def test_opening_1000_shards_reads_no_shard_byte(tmp_path):
    directory = str(tmp_path / "open")
    record = many_shards(directory, QUICK["open_examples"])
    assert record["shards"] == 1000 and record["examples"] == 1000 and record["world"] == 4
    opened = open_cache(directory)
    assert opened["shards"] == 1000 and opened["bytes_hashed_after_open"] == 0
    assert 0 < opened["bytes_hashed_after_first_read"] < 10_000  # one shard, checked on its first read
    assert opened["seconds"] < OPEN_SECONDS
