import numpy as np
import pytest

from svd.data.order import EpochPermutation, rank_positions, stream_indices


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 4097, 65_537])
def test_each_epoch_is_a_permutation(n):
    out = EpochPermutation(n, seed=3, epoch=0)(np.arange(n))
    assert np.array_equal(np.sort(out), np.arange(n))


def test_epochs_and_seeds_give_different_orders():
    n = 1000
    a = EpochPermutation(n, seed=0, epoch=0)(np.arange(n))
    assert not np.array_equal(a, EpochPermutation(n, seed=0, epoch=1)(np.arange(n)))
    assert not np.array_equal(a, EpochPermutation(n, seed=1, epoch=0)(np.arange(n)))
    assert np.array_equal(a, EpochPermutation(n, seed=0, epoch=0)(np.arange(n)))


def test_the_order_is_well_shuffled():
    n = 10_000
    out = EpochPermutation(n, seed=0, epoch=0)(np.arange(n))
    # neighbours in the stream are far apart in the table, and the order is uncorrelated with position
    assert np.median(np.abs(np.diff(out))) > n / 10
    assert abs(np.corrcoef(np.arange(n), out)[0, 1]) < 0.05


def test_stream_positions_cross_epochs_and_any_slice_agrees_with_the_whole():
    n = 13
    whole = stream_indices(np.arange(3 * n), n, seed=5)
    for epoch in range(3):
        assert sorted(whole[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert np.array_equal(stream_indices(np.arange(20, 30), n, seed=5), whole[20:30])


def test_large_domains_need_no_materialised_permutation():
    n = 152_000_000  # LVD-F
    out = EpochPermutation(n, seed=0, epoch=7)(np.array([0, 1, n - 1]))
    assert ((out >= 0) & (out < n)).all()
    assert len(set(out.tolist())) == 3


def test_ranks_take_consecutive_slices_of_the_step():
    assert rank_positions(consumed=12, batch_per_rank=4, rank=0).tolist() == [12, 13, 14, 15]
    assert rank_positions(consumed=12, batch_per_rank=4, rank=2).tolist() == [20, 21, 22, 23]


def test_positions_outside_the_epoch_are_refused():
    with pytest.raises(IndexError):
        EpochPermutation(10, 0, 0)(np.array([10]))


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 4097, 65_537])
def test_the_inverse_finds_where_each_index_is_read(n):
    perm = EpochPermutation(n, seed=11, epoch=3)
    positions = np.arange(n)
    assert np.array_equal(perm.inverse(perm(positions)), positions)
    assert np.array_equal(perm(perm.inverse(positions)), positions)
