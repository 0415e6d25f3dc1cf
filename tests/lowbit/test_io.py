"""lowbit.save / lowbit.load: round trips, packed sub-byte storage, and refusal of bad files."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from lowbit.graph import Graph, Node, Sequential, TensorSpec
from lowbit.io import LIMITS, ModelFileError, load, model_size, save
from lowbit.quantization.formats import FORMATS
from lowbit.runtime import Session


@pytest.fixture
def graph(rng) -> Graph:
    return Sequential((None, 3, 8, 8), [("conv", rng.standard_normal((4, 3, 3, 3)), rng.standard_normal(4),
                                         {"pads": (1, 1, 1, 1)}), ("relu",), ("max_pool", (2, 2)), ("flatten",),
                                        ("gemm", rng.standard_normal((5, 64)), rng.standard_normal(5))]).graph


def _coded(rng, op: str, codes: np.ndarray) -> Graph:
    params = {"codes": codes, "scales": rng.random((codes.shape[0], 1)).astype(np.float32)}
    return Graph([Node(op, ["x", "codes", "scales"], ["y"], {"group_size": 64})], {"x": TensorSpec((None, 64))},
                 ["y"], params).validate()


def test_round_trip_is_bit_identical(graph, rng, tmp_path):
    path = tmp_path / "m.lowbit"
    save(graph, path)
    loaded = load(path)
    assert [(n.op, n.name, n.inputs, n.outputs) for n in loaded.nodes] == \
        [(n.op, n.name, n.inputs, n.outputs) for n in graph.nodes]
    assert loaded.inputs == graph.inputs and loaded.outputs == graph.outputs
    x = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    (a,), (b,) = Session(graph).run(x).values(), Session(loaded).run(x).values()
    np.testing.assert_array_equal(a, b)
    assert model_size(graph) == graph.nbytes()


def test_round_trip_keeps_scalar_params(tmp_path):
    """0-d parameters (an imported model's scale and zero point of one tensor) come back 0-d."""
    graph = Graph([Node("QuantizeLinear", ["x", "s", "z"], ["y"])], {"x": TensorSpec((None, 4))}, ["y"],
                  {"s": np.array(0.5, np.float32), "z": np.array(3, np.uint8)}).validate()
    save(graph, tmp_path / "q.lowbit")
    loaded = load(tmp_path / "q.lowbit")
    assert loaded.params["s"].shape == () and loaded.params["z"].shape == () and loaded.params["z"] == 3
    x = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
    np.testing.assert_array_equal(Session(loaded).run(x)["y"], Session(graph).run(x)["y"])


@pytest.mark.parametrize("name", [f for f in FORMATS if FORMATS[f].bits < 8])
def test_codes_are_stored_packed(rng, tmp_path, name):
    """Every sub-byte format of the table stores its codes as its storage qtype packs them."""
    fmt = FORMATS[name]
    codes, _ = fmt.quantize(rng.normal(size=(32, 64)).astype(np.float32))
    g = _coded(rng, fmt.ops["Gemm"], codes)
    path = tmp_path / "m.lowbit"
    save(g, path)
    loaded = load(path)
    np.testing.assert_array_equal(loaded.params["codes"], codes)
    assert loaded.params["codes"].dtype == codes.dtype == fmt.qtype.dtype
    assert model_size(g) == 32 * 64 * fmt.bits // 8 + 32 * 4
    assert path.stat().st_size < model_size(g) + 2000  # headers and zip directory only
    with zipfile.ZipFile(path) as z:
        entry = json.loads(z.read("graph.json"))["params"]["codes"]
    assert entry["storage"] == fmt.storage and entry["shape"] == [32, 64]


def test_out_of_range_codes_stay_raw(rng, tmp_path):
    codes = rng.integers(-8, 8, (4, 64)).astype(np.int8)
    codes[0, 0] = 9
    g = _coded(rng, "lowbit.Int4Gemm", codes)
    assert model_size(g) == g.nbytes()
    save(g, tmp_path / "m.lowbit")
    np.testing.assert_array_equal(load(tmp_path / "m.lowbit").params["codes"], codes)


def _param_file(path, name: str) -> str:
    """The zip member that holds param ``name`` of the model file at ``path``."""
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read("graph.json"))["params"][name]["file"]


def _header_of(graph, folder) -> bytes:
    """graph.json as save writes it for ``graph``."""
    save(graph, folder / "for_header.lowbit")
    with zipfile.ZipFile(folder / "for_header.lowbit") as z:
        return z.read("graph.json")


def _rewrite(path, *, header=None, member=None, data=None):
    """Copy the zip at ``path`` with graph.json replaced by ``header(old)`` and/or ``member`` replaced by ``data``."""
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    if header is not None:
        members["graph.json"] = json.dumps(header(json.loads(members["graph.json"]))).encode()
    if member is not None:
        members[member] = data
    with zipfile.ZipFile(path, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)


def test_truncated_and_corrupted_files_are_refused(graph, tmp_path):
    path = tmp_path / "m.lowbit"
    save(graph, path)
    raw = path.read_bytes()
    (tmp_path / "t.lowbit").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match="not a lowbit model file or truncated/corrupted"):
        load(tmp_path / "t.lowbit")
    flipped = bytearray(raw)
    flipped[200] ^= 0xFF  # inside the first stored member: the CRC check fails
    (tmp_path / "c.lowbit").write_bytes(bytes(flipped))
    with pytest.raises(ModelFileError, match="member 'graph.json' is corrupted"):
        load(tmp_path / "c.lowbit")
    (tmp_path / "n.lowbit").write_text("hello")
    with pytest.raises(ValueError, match="not a lowbit model file"):
        load(tmp_path / "n.lowbit")


def test_unknown_version_and_format_are_refused(graph, tmp_path):
    path = tmp_path / "m.lowbit"
    save(graph, path)
    _rewrite(path, header=lambda h: {**h, "format_version": 7})
    with pytest.raises(ValueError, match="format_version 7 is not supported .*version 1"):
        load(path)
    _rewrite(path, header=lambda h: {**h, "format_version": 1, "format": "other"})
    with pytest.raises(ValueError, match="not a lowbit model file"):
        load(path)


def test_inconsistent_params_are_refused(graph, tmp_path):
    path = tmp_path / "m.lowbit"
    save(graph, path)
    name = next(iter(graph.params))

    def reshape(h):
        h["params"][name]["shape"] = [1, 2]
        return h
    _rewrite(path, header=reshape)
    with pytest.raises(ValueError, match=f"param {name!r}: stored as"):
        load(path)
    save(graph, path)
    member = _param_file(path, name)
    _rewrite(path, member=member, data=b"")
    with pytest.raises(ValueError, match=f"param {name!r}"):
        load(path)
    save(graph, path)

    def drop(h):
        h["nodes"] = h["nodes"][1:]
        return h
    _rewrite(path, header=drop)
    with pytest.raises(ValueError, match="not defined before it"):
        load(path)


def test_pickled_param_is_refused(graph, tmp_path):
    path = tmp_path / "m.lowbit"
    save(graph, path)
    name = next(iter(graph.params))
    member = _param_file(path, name)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    _rewrite(path, member=member, data=buffer.getvalue())
    with pytest.raises(ModelFileError, match=f"param {name!r}: unreadable .*never unpickles") as refused:
        load(path)
    assert "allow_pickle" not in str(refused.value)


def _bomb(path, member: str, header: dict | None, inflated: int) -> None:
    """A zip whose ``member`` inflates ``inflated`` zero bytes from a few hundred kB (written in chunks)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        if header is not None:
            archive.writestr("graph.json", json.dumps(header))
        with archive.open(member, "w", force_zip64=True) as f:
            chunk = bytes(1 << 20)
            for _ in range(inflated >> 20):
                f.write(chunk)


def test_zip_bombs_are_refused_before_inflating(graph, tmp_path):
    """A small file inflating far more than it stores is refused from the declared sizes: nothing large is
    allocated (tracemalloc), whether the bomb is graph.json, a param or a QTensor array."""
    import tracemalloc

    from lowbit.qtensor import QTensor

    header = json.loads(_header_of(graph, tmp_path))
    name = next(iter(header["params"]))
    header["params"] = {name: {**header["params"][name], "file": "params/0.npy"}}
    cases = [("graph.json", None, "member 'graph.json' declares 268435456 bytes, more than the 67108864"),
             ("params/0.npy", header, "member 'params/0.npy' .*(inflates|declares)")]
    tracemalloc.start()
    try:
        for i, (member, head, match) in enumerate(cases):
            _bomb(tmp_path / f"b{i}.lowbit", member, head, 256 << 20)
            with pytest.raises(ModelFileError, match=match):
                load(tmp_path / f"b{i}.lowbit")
        _bomb(tmp_path / "q.npz", "data.npy", None, 256 << 20)
        with pytest.raises(ModelFileError, match="member 'data.npy' inflates .* a zip bomb"):
            QTensor.load(tmp_path / "q.npz")
        assert tracemalloc.get_traced_memory()[1] < 32 << 20
    finally:
        tracemalloc.stop()


def test_declared_sizes_are_bounded_by_the_limits(graph, tmp_path, monkeypatch):
    path = tmp_path / "m.lowbit"
    save(graph, path)
    monkeypatch.setitem(LIMITS, "total", 16)
    with pytest.raises(ModelFileError, match=r"the params declare \d+ bytes, more than LIMITS\['total'\] = 16"):
        load(path)
    monkeypatch.setitem(LIMITS, "total", 64 << 30)
    header = json.loads(_header_of(graph, tmp_path))
    name = next(iter(header["params"]))
    for entry, match in (({"shape": [-1]}, "cannot be stored"), ({"shape": [1 << 40, 1 << 40]}, "more than LIMITS"),
                         ({"dtype": "object"}, "cannot be stored"), ({"shape": "x"}, "malformed entry")):
        bad = {**header, "params": {**header["params"], name: {**header["params"][name], **entry}}}
        _rewrite(path, member="graph.json", data=json.dumps(bad).encode())
        with pytest.raises(ModelFileError, match=match):
            load(path)
    deep = "[" * 100_000 + "]" * 100_000  # the JSON parser's recursion
    _rewrite(path, member="graph.json", data=deep.encode())
    with pytest.raises(ModelFileError):
        load(path)


def test_unsavable_attribute_is_named(graph, tmp_path):
    graph.nodes[0].attrs["bad"] = object()
    with pytest.raises(TypeError, match="attr 'bad'"):
        save(graph, tmp_path / "m.lowbit")
