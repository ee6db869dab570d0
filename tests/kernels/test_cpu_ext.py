"""The CPU helpers' build (``kernels/cpu_ext.py``): a failing compiler leaves no library and no
partial file behind (callers then take the torch ops), a working one builds once per source
version into the cache directory, and a helper that cannot allocate raises naming itself."""

import pytest

from vllm_kvstream.kernels import cpu_ext


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("VLLM_KVSTREAM_CACHE_DIR", str(tmp_path))
    cpu_ext.library.cache_clear()
    yield tmp_path
    cpu_ext.library.cache_clear()


def test_a_failing_compiler_leaves_nothing_and_torch_serves(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # exits 1 for any arguments
    assert cpu_ext.library() is None
    assert list(fresh.iterdir()) == []  # the temporary file removed
    assert "failed" in caplog.text and "torch serves" in caplog.text


def test_a_build_is_made_once_and_reused(fresh):
    if cpu_ext._compiler() is None:
        # Justified: the build needs a compiler; without one the first test covers what happens.
        pytest.skip("no C compiler on this machine")
    lib = cpu_ext.library()
    assert lib is not None
    built = sorted(p.name for p in fresh.iterdir())
    assert len(built) == 1 and built[0].startswith("kvstream_cpu_") and built[0].endswith(".so")
    cpu_ext.library.cache_clear()
    assert cpu_ext.library() is not None and sorted(p.name for p in fresh.iterdir()) == built


def test_a_nonzero_status_raises_naming_the_helper():
    with pytest.raises(MemoryError, match="kvs_quant_decode"):
        cpu_ext._check("kvs_quant_decode", 1)
    cpu_ext._check("kvs_quant_decode", 0)
