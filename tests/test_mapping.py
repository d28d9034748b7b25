"""Layer maps: the documented pairs, RAIL-KD's seeded draws, and the errors."""

import pytest

from fastted import (
    LayerMap,
    RandomLayerMap,
    explicit_map,
    interval_layers,
    interval_map,
    last_k_map,
    uniform_map,
)


@pytest.mark.parametrize(
    "n,interval,layers",
    [
        (12, 1, list(range(12))),
        (12, 2, [1, 3, 5, 7, 9, 11]),
        (12, 3, [2, 5, 8, 11]),
        (6, 4, [3]),
        (5, 6, []),
    ],
)
def test_interval_rule(n, interval, layers):
    assert interval_layers(n, interval) == layers


def test_interval_map_pairs_each_models_rule():
    assert interval_map(6, 12, 1, 2).pairs == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert interval_map(4, 12, 2, 6).pairs == [(1, 5), (3, 11)]
    with pytest.raises(ValueError, match="same, non-zero count"):
        interval_map(6, 12, 1, 3)
    with pytest.raises(ValueError, match="interval must be a positive int"):
        interval_map(6, 12, 0, 2)


@pytest.mark.parametrize(
    "n_s,n_t,pairs",
    [
        (6, 12, [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]),
        (4, 6, [(0, 0), (1, 2), (2, 3), (3, 5)]),
        (3, 3, [(0, 0), (1, 1), (2, 2)]),
        (12, 6, [(1, 0), (3, 1), (5, 2), (7, 3), (9, 4), (11, 5)]),  # a larger student (DWT)
    ],
)
def test_uniform_map(n_s, n_t, pairs):
    assert uniform_map(n_s, n_t).pairs == pairs


@pytest.mark.bad_input
def test_last_k_and_explicit_maps():
    assert last_k_map(6, 12, 3).pairs == [(3, 9), (4, 10), (5, 11)]
    with pytest.raises(ValueError, match="k=7 exceeds"):
        last_k_map(6, 12, 7)
    assert explicit_map([(0, 5), (2, 11)], 3, 12) == LayerMap((0, 2), (5, 11))
    with pytest.raises(ValueError, match="teacher has layers 0..11"):
        explicit_map([(0, 12)], 3, 12)
    with pytest.raises(ValueError, match="student has layers 0..2"):
        explicit_map([(-1, 3)], 3, 12)
    with pytest.raises(ValueError, match="pairs map a student layer twice"):
        explicit_map([(0, 3), (0, 4)], 3, 12)
    with pytest.raises(ValueError, match="non-empty list"):
        explicit_map([], 3, 12)
    with pytest.raises(ValueError, match="as many student layers"):
        LayerMap((0, 1), (2,))
    with pytest.raises(ValueError, match=r"teacher layers must be ints >= 0 \(layer indices\), got -1"):
        LayerMap((0,), (-1,))
    with pytest.raises(ValueError, match="student layers must be ints >= 0"):
        LayerMap((1.0,), (2,))


def test_random_map_draws_sorted_distinct_layers_from_its_candidates():
    layer_map = RandomLayerMap(6, 12, teacher_layers=range(11), per="step", seed=1)
    draws = [layer_map.draw(step=s) for s in range(200)]
    for d in draws:
        assert d.student == (0, 1, 2, 3, 4, 5)
        assert list(d.teacher) == sorted(set(d.teacher)) and len(d.teacher) == 6
        assert set(d.teacher) <= set(range(11))
    # Over many draws every candidate layer is used, and the draws differ.
    assert set().union(*(d.teacher for d in draws)) == set(range(11))
    assert len({d.teacher for d in draws}) > 100


def test_random_map_is_a_function_of_seed_and_counter():
    a = RandomLayerMap(4, 12, per="step", seed=7)
    b = RandomLayerMap(4, 12, per="step", seed=7)
    c = RandomLayerMap(4, 12, per="step", seed=8)
    first = [a.draw(step=s).teacher for s in range(50)]
    # The same seed: the same draws, in any order of asking (a resumed run asks from its step on).
    assert [b.draw(step=s).teacher for s in reversed(range(50))] == first[::-1]
    assert [c.draw(step=s).teacher for s in range(50)] != first
    per_epoch = RandomLayerMap(4, 12, per="epoch", seed=7)
    assert len({per_epoch.draw(step=s, epoch=3).teacher for s in range(20)}) == 1
    assert per_epoch.draw(epoch=3) == RandomLayerMap(4, 12, per="epoch", seed=7).draw(step=99, epoch=3)


@pytest.mark.bad_input
def test_random_map_errors():
    with pytest.raises(ValueError, match="offers 3 distinct layers, but 4 student layers"):
        RandomLayerMap(4, 12, teacher_layers=[0, 1, 2])
    with pytest.raises(ValueError, match="per must be one of"):
        RandomLayerMap(4, 12, per="batch")
    with pytest.raises(ValueError, match="teacher has layers 0..11"):
        RandomLayerMap(4, 12, teacher_layers=[12])
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        RandomLayerMap(4, 12, per="step").draw(step=-1)
