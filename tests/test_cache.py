"""The resized cache's writer: rows written through the file, shrunk when samples are skipped."""

import numpy as np
import pytest

from steel_seg.data.cache import RowWriter


@pytest.mark.parametrize("reserved, written", [(4, 4), (4, 1), (100_000, 99_999), (3, 0)])
def test_row_writer_keeps_exactly_the_rows_written(tmp_path, reserved, written):
    rng = np.random.default_rng(reserved + written)
    rows = rng.integers(0, 256, (written, 5, 7, 3), dtype=np.uint8)
    with RowWriter(tmp_path / "a.npy", (reserved, 5, 7, 3)) as writer:
        for row in rows:
            writer.write(row)
    stored = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert stored.shape == (written, 5, 7, 3) and stored.dtype == np.uint8
    np.testing.assert_array_equal(stored, rows)
    assert (tmp_path / "a.npy").stat().st_size == stored.offset + rows.nbytes


def test_row_writer_refuses_a_row_of_the_wrong_shape(tmp_path):
    with RowWriter(tmp_path / "a.npy", (2, 5, 7)) as writer:
        with pytest.raises(ValueError, match="a.npy: row of uint8 \\(7, 5\\), expected uint8 \\(5, 7\\)"):
            writer.write(np.zeros((7, 5), np.uint8))
