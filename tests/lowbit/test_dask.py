"""``lowbit.dask.predict`` on a 2-process LocalCluster (loopback only) against one process's session."""

from __future__ import annotations

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
onnx = pytest.importorskip("onnx")
da = pytest.importorskip("dask.array")

import lowbit  # noqa: E402
import lowbit.dask as lowbit_dask  # noqa: E402
from lowbit.onnx import InferenceSession, examples  # noqa: E402
from lowbit.onnx.quantization import quantize_static  # noqa: E402
from tests.lowbit.test_onnx_quantization import ImageReader  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The digits CNN quantized to int8 (static, QDQ) as an ONNX file, and the same graph as a .lowbit file."""
    folder = tmp_path_factory.mktemp("dask_models")
    onnx.save(examples.digits_cnn(), folder / "cnn.onnx")
    quantize_static(str(folder / "cnn.onnx"), str(folder / "int8.onnx"), ImageReader(4, batch=8), per_channel=True)
    lowbit.save(lowbit.onnx.load(str(folder / "int8.onnx")), folder / "int8.lowbit")
    return {"onnx": str(folder / "int8.onnx"), "lowbit": str(folder / "int8.lowbit")}


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        yield c


def _images(n: int) -> np.ndarray:
    return examples.image_feed(n, 8, seed=5, channels=1)["input"]


def _one_process(path: str, x: np.ndarray) -> np.ndarray:
    if path.endswith(".onnx"):
        return InferenceSession(path).run(None, {"input": x})[0]
    graph = lowbit.load(path)
    return lowbit.Session(graph, fallback=False).run({"input": x})[graph.outputs[0]]


@pytest.mark.parametrize("kind", ["onnx", "lowbit"])
def test_chunks_on_two_workers_equal_one_process(client, models, kind):
    x = _images(70)
    want = _one_process(models[kind], x)
    for chunks in (16, 35, 70):
        got = lowbit_dask.predict(models[kind], da.from_array(x, chunks=(chunks, 1, 8, 8))).compute()
        np.testing.assert_array_equal(got, want)
    loads = client.run(lambda: dict(lowbit_dask.LOADS))  # per worker process: each model loaded once
    assert all(max(counts.values()) == 1 for counts in loads.values() if counts)


def test_bytes_dataframe_and_batch_size(client, models):
    dd = pytest.importorskip("dask.dataframe")
    pd = pytest.importorskip("pandas")
    x = _images(40)
    want = _one_process(models["onnx"], x)
    with open(models["onnx"], "rb") as f:
        data = f.read()
    got = lowbit_dask.predict(data, da.from_array(x, chunks=(40, 1, 8, 8)), batch_size=7).compute()
    np.testing.assert_array_equal(got, want)
    frame = dd.from_pandas(pd.DataFrame(x.reshape(40, 64)), npartitions=3)  # a row: an image's 64 pixels
    table = lowbit_dask.predict(models["lowbit"], frame).compute()
    assert list(table.columns) == [f"{lowbit.load(models['lowbit']).outputs[0]}_{j}" for j in range(10)]
    np.testing.assert_array_equal(table.to_numpy(), want)
    with pytest.raises(ValueError, match="expected shape"):  # 63 columns are not an image
        lowbit_dask.predict(models["onnx"], dd.from_pandas(pd.DataFrame(x.reshape(40, 64)[:, :63]), npartitions=2))


def test_bad_model_or_input_fails_on_the_client(client, models, tmp_path):
    x = da.from_array(_images(8), chunks=4)
    with pytest.raises(FileNotFoundError, match="model: no file"):
        lowbit_dask.predict(str(tmp_path / "missing.onnx"), x)
    with pytest.raises(ValueError, match="expected shape"):
        lowbit_dask.predict(models["onnx"], da.zeros((8, 1, 9, 9), np.float32, chunks=4))
    with pytest.raises(TypeError, match="expected dtype float32, got float64"):
        lowbit_dask.predict(models["onnx"], x.astype(np.float64))
    with pytest.raises(ValueError, match="output_names"):
        lowbit_dask.predict(models["onnx"], x, output_names=["nope"])
    with pytest.raises(ValueError, match="batch_size"):
        lowbit_dask.predict(models["onnx"], x, batch_size=0)


def _compiled_in_this_process() -> int:
    """Functions Numba compiled in this process (not loaded from its disk cache)."""
    import gc

    from numba.core.dispatcher import Dispatcher

    return sum(sum(d.stats.cache_misses.values()) for d in gc.get_objects() if isinstance(d, Dispatcher))


def test_new_workers_load_every_kernel_from_the_cache(client, models):
    """After a first job, fresh worker processes compile nothing: the kernels come from Numba's disk cache."""
    x = da.from_array(_images(32), chunks=8)
    lowbit_dask.predict(models["lowbit"], x).compute()  # the first job: whatever was missing is cached now
    client.restart()
    lowbit_dask.predict(models["lowbit"], x).compute()
    assert client.run(_compiled_in_this_process) == {w: 0 for w in client.scheduler_info()["workers"]}


def test_a_killed_worker_costs_only_its_tasks(client, models):
    """One worker process dies mid-job: Dask reruns its tasks elsewhere (or on the restarted worker) and the
    result is complete and identical."""
    import os
    import signal

    x = _images(400)
    want = _one_process(models["onnx"], x)
    victim = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    future = client.compute(lowbit_dask.predict(models["onnx"], da.from_array(x, chunks=(8, 1, 8, 8))))
    os.kill(pid, signal.SIGKILL)
    np.testing.assert_array_equal(future.result(timeout=300), want)
    assert victim not in client.scheduler_info()["workers"]  # it did die (its nanny started a new one)


def test_cli_runs_a_file_on_a_local_cluster(models, tmp_path, capsys):
    from lowbit.cli import main

    x = _images(50)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", models["onnx"], "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"),
                 "--dask", "local:2", "--batch", "16"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), _one_process(models["onnx"], x))
    captured = capsys.readouterr()
    assert "[4/4] chunks" in captured.err and "saved to" in captured.out
    assert main(["run", models["onnx"], "--input", str(tmp_path / "x.npy"), "--dask", "local:0"]) == 2
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame(x.reshape(50, 64), columns=[f"p{i}" for i in range(64)]).to_parquet(tmp_path / "x.parquet")
    assert main(["run", models["lowbit"], "--input", str(tmp_path / "x.parquet"), "--output", str(tmp_path / "z.npy"),
                 "--dask", "local:1"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "z.npy"), _one_process(models["onnx"], x))
