"""The CPU description benchmarks print: cache sizes as sysfs writes them, CPU lists, and the whole record."""

from __future__ import annotations

from secateurs.measure import _cpu_count, _size_bytes, cpu_info


def test_sizes_and_cpu_lists():
    assert _size_bytes("32K") == 32768 and _size_bytes("32768K") == 32 << 20 and _size_bytes("2M") == 2 << 20
    assert _size_bytes("4096") == 4096 and _size_bytes("lots") is None
    assert _cpu_count("0") == 1 and _cpu_count("0-1") == 2 and _cpu_count("0-3,8,10-11") == 7
    assert _cpu_count("x") is None


def test_cpu_info_record():
    info = cpu_info()
    assert set(info) >= {"model", "cpus", "caches", "last_level_cache_bytes"}
    for level, cache in info["caches"].items():
        assert level.startswith("L") and (cache["bytes"] is None or cache["bytes"] > 0)
    if info["caches"]:
        assert info["last_level_cache_bytes"] == info["caches"][max(info["caches"])]["bytes"]
