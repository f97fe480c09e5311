"""``tests/reference`` is a byte-for-byte copy of the project's ``shared/reference``."""

from __future__ import annotations

import pytest

from conftest import REFERENCE_DIR, SHARED_REFERENCE_DIR


@pytest.mark.skipif(not SHARED_REFERENCE_DIR.is_dir(), reason="shared/ is not beside this checkout")
def test_the_shipped_reference_tensors_are_the_shared_ones():
    shared = sorted(p.name for p in SHARED_REFERENCE_DIR.iterdir() if p.is_file())
    assert shared and sorted(p.name for p in REFERENCE_DIR.iterdir() if p.is_file()) == shared
    for name in shared:
        assert (REFERENCE_DIR / name).read_bytes() == (SHARED_REFERENCE_DIR / name).read_bytes(), name
