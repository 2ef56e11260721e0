import numpy as np
import pytest

from steel_seg.data.rle import RLEError, rle_decode, rle_encode


def test_numbering_is_one_indexed_and_column_major():
    # H=3, W=2: pixel 1 is (0,0), 2 is (1,0), 3 is (2,0), 4 is (0,1).
    mask = rle_decode("2 3", (3, 2))
    expected = np.array([[0, 1], [1, 0], [1, 0]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    assert rle_encode(expected) == "2 3"


@pytest.mark.parametrize("seed", range(20))
def test_round_trip_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 40, size=2))
    mask = rng.random(shape) < rng.random()
    assert np.array_equal(rle_decode(rle_encode(mask), shape), mask)


@pytest.mark.parametrize("fill", [False, True])
def test_round_trip_empty_and_full(fill):
    mask = np.full((256, 1600), fill)
    rle = rle_encode(mask)
    assert rle == ("1 409600" if fill else "")
    assert np.array_equal(rle_decode(rle, mask.shape), mask)


def test_round_trip_corners():
    mask = np.zeros((4, 5), bool)
    mask[0, 0] = mask[-1, -1] = mask[-1, 0] = mask[0, -1] = True
    assert rle_encode(mask) == "1 1 4 1 17 1 20 1"  # (0,4) is pixel 4*4+1
    assert np.array_equal(rle_decode(rle_encode(mask), mask.shape), mask)


@pytest.mark.parametrize(
    "rle, fragment",
    [
        ("1 2 5", "odd number of tokens"),
        ("1 two", "'two' is not an integer"),
        ("1.5 2", "'1.5' is not an integer"),
        ("3 0", "length 0"),
        ("3 -2", "length -2"),
        ("0 2", "numbered from 1"),
        ("19 3", "past the image"),
        ("10 2 3 2", "not sorted"),
        ("3 4 5 2", "overlaps"),
    ],
)
def test_malformed_strings_name_where(rle, fragment):
    with pytest.raises(RLEError) as info:
        rle_decode(rle, (4, 5), where="train.csv:7 (ImageId x.jpg, ClassId 3)")
    message = str(info.value)
    assert message.startswith("train.csv:7 (ImageId x.jpg, ClassId 3)")
    assert fragment in message


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError):
        rle_encode(np.zeros((2, 2, 2)))
