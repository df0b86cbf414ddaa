"""The numpy-only .pth reader: torch.save's files read bit for bit, bad or hostile files refused."""

import io
import os
import pickle
import tracemalloc
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mistral.errors import MistralError
from mistral.pth_file import read_pth


def bits(t: torch.Tensor) -> bytes:
    """torch's own bytes of a tensor, as the reader carries them (bfloat16 as uint16 bits)."""
    t = t.detach().contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k, t in want.items():
        assert got[k].dtype == str(t.dtype).removeprefix("torch."), k
        assert got[k].shape == tuple(t.shape) == got[k].data.shape, k
        assert got[k].data.tobytes() == bits(t), k  # tobytes: in logical (C) order
        assert np.array_equal(got[k].to_numpy(), t.detach().float().numpy()), k


def save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def rewrite(src: Path, dst: Path, edit: Callable[[str, bytes], bytes | None], **kw) -> Path:
    """A copy of the zip with each member passed through ``edit`` (None drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", **kw) as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def refused(path: Path, match: str) -> str:
    with pytest.raises(MistralError, match=match) as e:
        read_pth(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    return msg


# Crafted checkpoints: a pickle written by hand, with the storage records given as bytes.
class Storage:
    def __init__(self, key: str, kind: str, numel: int) -> None:
        self.key, self.kind, self.numel = key, kind, numel


class Tensor:
    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", getattr(torch, obj.kind), obj.key, "cpu", obj.numel)
        return None


def write_pth(path: Path, obj: object, records: dict[str, bytes]) -> Path:
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
    return path


RAN = []


def record(what: str) -> None:
    RAN.append(what)


class Payload:
    def __reduce__(self):
        return record, ("payload ran",)


class Thing:
    pass


def test_round_trip_of_float32_float16_bfloat16_is_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    want = {
        "w": torch.randn(5, 7, generator=g),
        "h": torch.randn(3, 4, generator=g).half(),
        "b": torch.randn(4, 3, generator=g).bfloat16(),
        "scalar": torch.tensor(1.5).bfloat16(),
        "empty": torch.empty(0, 3),
    }
    got = read_pth(save(tmp_path / "consolidated.00.pth", want))
    assert_same(got, want)
    # The top folder is the stem torch saw; a renamed file keeps it and still reads.
    os.rename(tmp_path / "consolidated.00.pth", tmp_path / "renamed.pth")
    assert_same(read_pth(str(tmp_path / "renamed.pth")), want)


def test_ordered_dict_and_module_state_dict(tmp_path):
    want = OrderedDict(z=torch.ones(2), a=torch.arange(6.0).reshape(2, 3).half())
    assert_same(read_pth(save(tmp_path / "o.pth", want)), want)
    sd = torch.nn.Linear(3, 2).state_dict()  # an OrderedDict carrying _metadata (a BUILD opcode)
    assert_same(read_pth(save(tmp_path / "sd.pth", sd)), sd)
    params = dict(torch.nn.Linear(3, 2).named_parameters())  # _rebuild_parameter
    assert_same(read_pth(save(tmp_path / "p.pth", params)), params)


def test_views_and_slices_of_a_larger_storage(tmp_path):
    big = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = {"t": big.t(), "rows": big[2:4], "col": big[:, 1], "step": big[1::2, ::3]}
    assert not want["t"].is_contiguous() and want["rows"].storage_offset() == 8
    got = read_pth(save(tmp_path / "v.pth", want))
    assert_same(got, want)
    assert got["t"].data.strides == (2, 8)  # a strided view, not a copy


def test_tensors_sharing_one_storage(tmp_path):
    base = torch.randn(10, generator=torch.Generator().manual_seed(2))
    want = {"all": base, "head": base[:4], "tail": base[6:]}
    path = save(tmp_path / "s.pth", want)
    with zipfile.ZipFile(path) as z:
        assert sum("/data/" in n for n in z.namelist()) == 1  # torch wrote the storage once
    got = read_pth(path)
    assert_same(got, want)
    assert np.shares_memory(got["all"].data, got["tail"].data)


def test_data_is_memory_mapped_not_read(tmp_path):
    want = {"w": torch.randn(1024, 4096), "h": torch.randn(4096).half()}  # 16 MiB
    path = save(tmp_path / "m.pth", want)
    tracemalloc.start()
    got = read_pth(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20, peak
    for t in got.values():
        chain, a = [], t.data
        while a is not None:
            chain.append(a)
            a = getattr(a, "base", None)
        assert any(isinstance(b, np.memmap) for b in chain)
        assert not t.data.flags.writeable
    assert_same(got, want)


def test_truncated_storage_record_is_refused(tmp_path):
    path = save(tmp_path / "t.pth", {"a": torch.randn(4, 4), "b": torch.randn(3)})
    short = rewrite(path, tmp_path / "short.pth", lambda n, d: d[:-4] if n == "t/data/0" else d)
    assert len(read_pth(rewrite(path, tmp_path / "same.pth", lambda n, d: d))) == 2
    refused(short, "t/data/0 holds 60 bytes, needs 64")


def test_missing_and_compressed_members_are_refused(tmp_path):
    path = save(tmp_path / "c.pth", {"a": torch.randn(256)})
    gone = rewrite(path, tmp_path / "gone.pth", lambda n, d: None if n == "c/data/0" else d)
    refused(gone, "missing member c/data/0")
    packed = rewrite(path, tmp_path / "z.pth", lambda n, d: d, compression=zipfile.ZIP_DEFLATED)
    refused(packed, "member c/data/0 is compressed")


def test_big_endian_is_refused(tmp_path):
    path = save(tmp_path / "e.pth", {"a": torch.ones(3)})
    big = rewrite(path, tmp_path / "big.pth", lambda n, d: b"big" if n == "e/byteorder" else d)
    refused(big, "byte order 'big'")


@pytest.mark.parametrize(
    ("offset", "size", "stride", "match"),
    [
        (0, (2, 3), (3, 1), "overruns"),
        (2, (3,), (1,), "overruns"),
        (4, (1,), (1,), "overruns"),
        (0, (2,), (-1,), "negative"),
        (0, (-1,), (1,), "negative"),
        (0, (2, 2), (1,), "malformed tensor"),
    ],
)
def test_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, match):
    storage = Storage("0", "FloatStorage", 4)
    ok = {"edge": Tensor(storage, 1, (3,), (1,)), "zero": Tensor(storage, 0, (4, 2), (0, 1))}
    got = read_pth(write_pth(tmp_path / "ok.pth", ok, {"0": np.arange(4.0, dtype="<f4").tobytes()}))
    assert got["edge"].to_numpy().tolist() == [1, 2, 3]  # the last element is inside
    assert got["zero"].to_numpy().tolist() == [[0, 1]] * 4
    bad = {"x": Tensor(storage, offset, size, stride)}
    refused(write_pth(tmp_path / "bad.pth", bad, {"0": bytes(16)}), match)


def test_forbidden_globals_are_refused_and_nothing_runs(tmp_path):
    hostile = pickle.dumps({"a": Payload()}, protocol=2)
    pickle.loads(hostile)
    assert RAN == ["payload ran"]  # the payload is live: plain pickle runs it
    RAN.clear()
    path = write_pth(tmp_path / "p.pth", {"a": Payload()}, {})
    refused(path, "refusing pickled global tests.test_pth_file.record")
    assert RAN == []
    refused(write_pth(tmp_path / "s.pth", {"a": os.system}, {}), r"global posix\.system")
    refused(write_pth(tmp_path / "c.pth", {"a": Thing()}, {}), r"test_pth_file\.Thing")


@pytest.mark.parametrize(
    ("tensor", "name"),
    [(torch.arange(3), "int64"), (torch.ones(2, dtype=torch.float64), "float64")],
)
def test_unsupported_dtype_is_refused_by_name(tmp_path, tensor, name):
    path = save(tmp_path / "i.pth", {"ok": torch.ones(2), "x": tensor})
    refused(path, f"unsupported dtype {name}")


def test_top_level_must_be_a_dict_of_tensors(tmp_path):
    refused(save(tmp_path / "t.pth", torch.ones(2)), "top level is a tensor, not a dict")
    refused(save(tmp_path / "l.pth", [torch.ones(2)]), "top level is a list, not a dict")
    refused(save(tmp_path / "n.pth", {"a": torch.ones(2), "n": 3}), "'n' is an int, not a tensor")
    refused(save(tmp_path / "k.pth", {1: torch.ones(2)}), "a key is an int, not a string")


def test_garbage_empty_and_missing_files_are_refused(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    refused(tmp_path / "empty.pth", "not a zip archive")
    (tmp_path / "junk.pth").write_bytes(os.urandom(4096))
    refused(tmp_path / "junk.pth", "not a zip archive")
    torch.save({"a": torch.ones(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    refused(tmp_path / "old.pth", "not a zip archive")
    refused(tmp_path / "absent.pth", "cannot read")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    refused(tmp_path / "other.zip", "no single data.pkl")


def test_any_damage_to_the_pickle_is_a_mistral_error(tmp_path):
    """Every cut and many flipped bytes of a real data.pkl: a clean refusal or a clean read."""
    path = save(tmp_path / "f.pth", {"a": torch.randn(2, 3), "b": torch.ones(4).half()})
    with zipfile.ZipFile(path) as z:
        pkl = z.read("f/data.pkl")
    rng = np.random.default_rng(0)
    damaged = [pkl[:n] for n in range(len(pkl))]
    for i in range(len(pkl)):
        damaged.append(pkl[:i] + bytes([pkl[i] ^ int(rng.integers(1, 256))]) + pkl[i + 1 :])
    refusals = 0
    for j, bad in enumerate(damaged):
        out = rewrite(
            path, tmp_path / f"d{j}.pth", lambda n, d, b=bad: b if n.endswith(".pkl") else d
        )
        try:
            read_pth(out)
        except MistralError as e:
            assert str(e).startswith(str(out)) and "\n" not in str(e)
            refusals += 1
        out.unlink()
    assert refusals >= len(pkl)  # at least every cut is refused


def test_memo_index_out_of_range_is_refused(tmp_path):
    """A BINPUT at index 2**32 makes the C unpickler zero gigabytes of memo; never run it."""
    bomb = b"\x80\x02}r" + (10**6).to_bytes(4, "little") + b"."  # {} stored at memo 10**6
    assert pickle.loads(bomb) == {}  # a valid pickle, one the reader could otherwise load
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("bomb/data.pkl", bomb)
    refused(path, "memo index 1000000")
