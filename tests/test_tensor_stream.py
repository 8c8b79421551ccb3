"""library/tensor_stream.py: lazy reads of safetensors / ckpt files and the streaming safetensors writer."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.file_io import CheckpointError, read_metadata
from library.tensor_stream import SafetensorsWriter, TensorFile

TENSORS = {
    "a.weight": torch.randn(3, 5),
    "b.half": torch.randn(4).half(),
    "c.bf16": torch.randn(2, 2, 3, 3).bfloat16(),
    "d.ids": torch.arange(7),
    "e.scalar": torch.tensor(2.5),
    "f.mask": torch.tensor([True, False, True]),
    "g.empty": torch.zeros(0, 4),
}


def test_writer_output_reads_back_exactly_with_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    layout = [(k, v.dtype, v.shape) for k, v in TENSORS.items()]
    with SafetensorsWriter(path, layout, {"ss_note": "hi"}) as w:
        for k, v in TENSORS.items():
            w.write(k, v)
    back = load_file(str(path))
    assert set(back) == set(TENSORS) and all(torch.equal(back[k], v) for k, v in TENSORS.items())
    assert read_metadata(path) == {"ss_note": "hi"}


def test_writer_refuses_wrong_order_shape_and_missing_tensors(tmp_path):
    layout = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match="out of order: expected a, got b"):
        SafetensorsWriter(tmp_path / "1.safetensors", layout).write("b", torch.zeros(3))
    with pytest.raises(ValueError, match=r"declared torch.float32 \[2\], got torch.float16 \[2\]"):
        SafetensorsWriter(tmp_path / "2.safetensors", layout).write("a", torch.zeros(2).half())
    w = SafetensorsWriter(tmp_path / "3.safetensors", layout)
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="closed after 1 of 2 tensors"):
        w.close()


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt", "legacy_ckpt"])
def test_tensor_file_shapes_dtypes_and_fresh_tensors(tmp_path, fmt):
    path = tmp_path / ("x.safetensors" if fmt == "safetensors" else "x.ckpt")
    if fmt == "safetensors":
        save_file(TENSORS, str(path))
    else:
        torch.save({"state_dict": TENSORS, "epoch": 3}, path, _use_new_zipfile_serialization=fmt == "ckpt")
    with TensorFile(path) as f:
        assert set(f.keys()) == set(TENSORS)
        for k, v in TENSORS.items():
            assert f.shape(k) == tuple(v.shape) and f.dtype(k) == v.dtype
            t = f.get(k)
            assert torch.equal(t, v)
            if t.numel() and t.dtype != torch.bool:
                t.zero_()  # the caller owns the tensor: the file's data stays as it was
        assert torch.equal(f.get("a.weight"), TENSORS["a.weight"])
        assert f.get("b.half", torch.float32).dtype == torch.float32 and f.get("d.ids", torch.float32).dtype == torch.int64
        with pytest.raises(KeyError, match="no tensor named nope"):
            f.get("nope")


def test_tensor_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        TensorFile(tmp_path / "missing.safetensors")
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(1000)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        TensorFile(path)
    junk = tmp_path / "j.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        TensorFile(junk)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copy_raw_passes_tensors_through_byte_for_byte(tmp_path, monkeypatch, kernel_copy):
    import os

    from safetensors.torch import load_file, save_file

    from library.tensor_stream import SafetensorsWriter, TensorFile

    src = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).half()}
    save_file(src, str(tmp_path / "src.safetensors"))
    if not kernel_copy:
        def unsupported(*args, **kwargs):
            raise OSError("copy_file_range unsupported")
        monkeypatch.setattr(os, "copy_file_range", unsupported)
    with TensorFile(tmp_path / "src.safetensors") as f:
        layout = [(k, f.dtype(k), f.shape(k)) for k in f.keys()]
        writer = SafetensorsWriter(tmp_path / "out.safetensors", layout, {"k": "v"})
        for key in f.keys():
            if key == "b":
                writer.write(key, f.get(key) + 1)  # one tensor changed in between the copies
            else:
                writer.copy_raw(key, *f.raw_range(key))
        writer.close()
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["a"], src["a"]) and torch.equal(out["c"], src["c"])
    assert torch.equal(out["b"], src["b"] + 1)
