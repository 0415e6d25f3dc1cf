"""pytest-benchmark settings for the microbenchmarks in this folder."""

from __future__ import annotations


def pytest_benchmark_update_json(config, benchmarks, output_json: dict) -> None:
    """Give every benchmark ``extra_info["ratio_vs_numpy"]``: NumPy's best time over its own.

    The baseline is the NumPy float32 benchmark of the same group (same shape) in
    the same run, so the ratio never mixes machines or moments; above 1 is faster.
    """
    entries = output_json["benchmarks"]
    numpy_best = {e["group"]: e["stats"]["min"] for e in entries if e["params"]["name"] == "numpy"}
    for entry in entries:
        if entry["group"] in numpy_best:
            entry["extra_info"]["ratio_vs_numpy"] = numpy_best[entry["group"]] / entry["stats"]["min"]
