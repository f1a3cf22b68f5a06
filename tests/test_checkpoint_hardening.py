"""Hostile and corrupt checkpoints: every one is refused with a one-line error before it can hang the
reader, write files, or make it allocate or work far beyond the file's size. Each test builds its
hostile file in ``tmp_path``; work and memory bounds are asserted through behaviour (the error comes
before the allocation: tracemalloc peaks, lowered module caps), never through wall-clock time."""

from __future__ import annotations

import codecs
import json
import struct
import subprocess
import sys
import tarfile
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrecon.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    convert_checkpoint,
    load_pth,
    read_checkpoint,
    safe_pickle,
    to_plain,
    write_safetensors,
)
from streamrecon.cli import main
from streamrecon.config import ConfigError, ModelConfig, config_from_model_kwargs, parse_model_string
from streamrecon.models import Cut3r
from streamrecon.pipeline.resolve import resolve_conf_thresh
from streamrecon.settings import SettingsError

from .conftest import tiny_config

_MiB = 2**20


def _official_args(cfg: ModelConfig) -> dict:
    return {"model": cfg.to_model_string(), "dpt_feature_dim": cfg.dpt_feature_dim, "dpt_last_dim": cfg.dpt_last_dim,
            "dpt_layer_dims": list(cfg.dpt_layer_dims)}


def _save_official(path: Path, model: dict | None = None, args: dict | None = None, **extra) -> Path:
    """An official-layout ``.pth`` (``model`` / ``args`` / ``epoch``) with a valid tiny model string."""
    payload = {"model": {"w": torch.zeros(2)} if model is None else model,
               "args": _official_args(tiny_config()) if args is None else args, "epoch": 0, **extra}
    torch.save(payload, path)
    return path


def _rezip(src: Path, dst: Path, transform) -> Path:
    """Copy a torch zip record by record; ``transform(name, data) -> (data, compress_type)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, kind = transform(info.filename, zin.read(info.filename))
            zout.writestr(info.filename, data, compress_type=kind)
    return dst


def _set_declared_size(path: Path, record: str, size: int) -> None:
    """Make the zip's central directory (and local header) declare ``size`` uncompressed bytes for ``record``."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(record)
    struct.pack_into("<I", raw, info.header_offset + 22, size)
    cd = raw.find(b"PK\x01\x02")
    while raw[cd + 46:cd + 46 + len(record)] != record.encode():
        cd = raw.find(b"PK\x01\x02", cd + 4)
    struct.pack_into("<I", raw, cd + 24, size)
    path.write_bytes(bytes(raw))


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


# 1. legacy tar (and raw-pickle) checkpoints ------------------------------------------------------


@pytest.mark.parametrize("member_type", [tarfile.FIFOTYPE, tarfile.SYMTYPE, tarfile.CHRTYPE])
def test_legacy_tar_checkpoint_is_refused_without_extracting(tmp_path, monkeypatch, member_type):
    path = tmp_path / "old.pth"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("storages", "tensors", "pickle"):
            info = tarfile.TarInfo(name)
            info.type = member_type
            info.linkname = "/etc/passwd" if member_type == tarfile.SYMTYPE else ""
            tar.addfile(info)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where torch's legacy reader extracts

    def no_extraction(*args, **kwargs):
        raise AssertionError("a tar member was extracted")

    for name in ("extract", "extractall", "extractfile", "makefifo", "makedev", "makelink"):
        monkeypatch.setattr(tarfile.TarFile, name, no_extraction)
    with pytest.raises(CheckpointError, match="legacy torch checkpoint.*tar"):
        read_checkpoint(path)
    assert not any(scratch.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["old.pth", "scratch"]


def test_legacy_raw_pickle_checkpoint_is_refused(tmp_path):
    # its reader allocates every storage at the size the pickle declares, before reading any data
    path = tmp_path / "old.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": {}}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy torch checkpoint.*raw-pickle"):
        read_checkpoint(path)


# 2. allowed callables that allocate ----------------------------------------------------------------


class _Calls:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("payload", [
    _Calls(bytearray, 64 * _MiB),
    _Calls(bytes, 64 * _MiB),
    _Calls(np.ndarray, (64 * _MiB,), "u1"),
    _Calls(codecs.encode, b"\0" * 64, "hex"),  # bytes -> bytes codecs, chained, would double every step
], ids=["bytearray", "bytes", "ndarray", "codecs-hex"])
def test_allocating_call_in_pickle_is_refused_before_allocating(tmp_path, payload):
    path = _save_official(tmp_path / "alloc.pth", extra=payload)
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
            read_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * _MiB, f"{peak} bytes allocated before the refusal"


def test_numpy_object_array_is_refused(tmp_path):
    # object arrays restore pointers from the pickle (a mismatched one crashes numpy)
    path = _save_official(tmp_path / "obj.pth", extra=np.array([1, "x"], dtype=object))
    with pytest.raises(UnsafeCheckpointError, match="dtype"):
        read_checkpoint(path)


def test_plain_bytes_and_numpy_values_still_load(tmp_path):
    path = _save_official(tmp_path / "ok.pth", extra={"b": b"xyz", "e": b"", "ba": bytearray(b"q"),
                                                      "s": np.float64(1.5), "a": np.arange(3.0)})
    extra = to_plain(load_pth(path)["extra"])
    assert extra["b"] == b"xyz" and extra["e"] == b"" and extra["ba"] == bytearray(b"q") and extra["s"] == 1.5
    assert type(extra["a"]) is np.ndarray and extra["a"].tolist() == [0.0, 1.0, 2.0]


# 3. zip records: declared sizes, inflation ---------------------------------------------------------


def _padded_pickle(name: str, data: bytes, pad: int = 2 * _MiB, storage_kind: int = zipfile.ZIP_STORED):
    """data.pkl deflated with ``pad`` zero bytes after its STOP (the pickle still reads)."""
    if name.endswith("/data.pkl"):
        return data + b"\0" * pad, zipfile.ZIP_DEFLATED
    return data, storage_kind if "/data/" in name else zipfile.ZIP_STORED


def test_deflated_record_over_the_cap_is_refused_before_inflating(tmp_path, monkeypatch):
    bomb = _rezip(_save_official(tmp_path / "src.pth"), tmp_path / "bomb.pth", _padded_pickle)
    assert bomb.stat().st_size < 64 * 1024
    monkeypatch.setattr(safe_pickle, "MAX_RECORD_BYTES", 1 * _MiB)
    monkeypatch.setattr(safe_pickle, "MAX_INFLATE_RATIO", 10**6)  # only the size cap applies

    def no_read(*args, **kwargs):
        raise AssertionError("torch read the archive")

    monkeypatch.setattr(torch, "load", no_read)
    with pytest.raises(CheckpointError, match="data.pkl' declares .* more than the 1048576"):
        read_checkpoint(bomb)


def test_zip_bomb_ratio_is_refused(tmp_path):
    bomb = _rezip(_save_official(tmp_path / "src.pth"), tmp_path / "bomb.pth", _padded_pickle)
    with pytest.raises(CheckpointError, match="zip bomb"):
        read_checkpoint(bomb)
    # the same layout without the padding still loads: deflated small records are fine
    plain = _rezip(tmp_path / "src.pth", tmp_path / "deflated.pth", lambda n, d: _padded_pickle(n, d, pad=0))
    assert read_checkpoint(plain).state_dict["w"].shape == (2,)


def test_compressed_tensor_record_is_refused(tmp_path):
    # storages are memory-mapped: a deflated one would be read as its compressed bytes
    src = _save_official(tmp_path / "src.pth", model={"w": torch.zeros(4096)})
    bad = _rezip(src, tmp_path / "bad.pth", lambda n, d: _padded_pickle(n, d, pad=0, storage_kind=zipfile.ZIP_DEFLATED))
    with pytest.raises(CheckpointError, match="tensor record .* is compressed"):
        read_checkpoint(bad)


def test_stored_record_declaring_more_than_it_holds_is_refused(tmp_path):
    path = _save_official(tmp_path / "lie.pth")
    with zipfile.ZipFile(path) as zf:
        record = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
    _set_declared_size(path, record, 4 * _MiB)
    with pytest.raises(CheckpointError, match="declares 4194304 bytes"):
        read_checkpoint(path)


# 4. shared sub-objects (a DAG) in the config -------------------------------------------------------


def _dag(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node, node]  # 2**depth paths, depth + 1 objects
    return node


def test_shared_lists_are_converted_once(monkeypatch):
    out = to_plain(_dag(10))
    assert out[0] is out[1], "a shared sub-object should be converted once (memoised by identity)"
    node, depth = out, 0
    while node:
        node, depth = node[0], depth + 1
    assert depth == 10


def test_shared_list_dag_beyond_the_node_budget_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_pickle, "MAX_PLAIN_NODES", 10_000)
    with pytest.raises(CheckpointError, match="expand to more than 10000"):
        to_plain(_dag(40))  # 2**41 nodes expanded, 41 objects
    path = _save_official(tmp_path / "dag.pth", args={**_official_args(tiny_config()), "junk": _dag(40)})
    assert path.stat().st_size < 64 * 1024
    with pytest.raises(CheckpointError, match="config too large"):
        read_checkpoint(path)


# 5. views larger than their storage ----------------------------------------------------------------


def test_expanded_view_is_refused_before_materialising(tmp_path):
    src = _save_official(tmp_path / "exp.pth", model={"w": torch.zeros(1).expand(10**6)})
    with pytest.raises(CheckpointError, match="'w' of shape \\(1000000,\\).*expanded"):
        read_checkpoint(src)
    with pytest.raises(CheckpointError, match="expanded"):
        convert_checkpoint(src, tmp_path / "out.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.pth"]


def test_overlapping_views_beyond_the_file_are_refused(tmp_path):
    x = torch.zeros(2**18)  # 1 MiB
    views = {f"v{i}": x.view(2**i, -1) for i in range(4)}  # four distinct full views of one storage
    with pytest.raises(CheckpointError, match="more than the .*-byte file"):
        read_checkpoint(_save_official(tmp_path / "views.pth", model=views))
    # the same tensor under two names (the DPT aliases) is one view
    ck = read_checkpoint(_save_official(tmp_path / "alias.pth", model={"a": x, "b": x}))
    assert ck.state_dict["a"].data_ptr() == ck.state_dict["b"].data_ptr()


# 6. config sizes and types ---------------------------------------------------------------------------


@pytest.mark.parametrize("change, field", [
    ({"enc_depth": 5000}, "enc_depth"),
    ({"dec_depth": 10**6}, "dec_depth"),
    ({"enc_embed_dim": 2**20, "enc_num_heads": 4}, "enc_embed_dim"),
    ({"dpt_layer_dims": (4, 8, 8, 10**6)}, "dpt_layer_dims"),
    ({"dec_num_heads": 0}, "dec_num_heads"),
    ({"img_size": (10**6, 64)}, "img_size"),
    ({"img_size": 64}, "img_size"),
    ({"patch_size": 10**4}, "patch_size"),
    ({"state_size": 10**8}, "state_size"),
    ({"mlp_ratio": 1e6}, "mlp_ratio"),
    ({"rope_freq": float("nan")}, "rope_freq"),
    ({"enc_depth": "2"}, "enc_depth"),
    ({"rgb_head": "yes"}, "rgb_head"),
    ({"enc_depth": True}, "enc_depth"),
    ({"mlp_ratio": "4"}, "mlp_ratio"),
    ({"conf_mode": ("exp", "1", "inf")}, "conf_mode"),
])
def test_config_out_of_range_or_of_wrong_type_names_the_field(change, field):
    with pytest.raises(ConfigError, match=f"invalid model config: .*{field}"):
        tiny_config(**change)


def test_model_string_with_a_huge_depth_is_refused():
    text = tiny_config().to_model_string().replace("enc_depth=2", "enc_depth=5000")
    with pytest.raises(ConfigError, match="enc_depth must be in \\[1, 64\\], got 5000"):
        config_from_model_kwargs(parse_model_string(text))


def test_presets_and_the_tiny_config_are_valid():
    from streamrecon.config import PRESETS

    for cfg in [*PRESETS.values(), tiny_config(), tiny_config("linear", dec_depth=3)]:
        assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


# 7. corrupt .safetensors and sidecars: one line on the command line -------------------------------------


def _good_safetensors(path: Path) -> Path:
    torch.manual_seed(0)
    model = Cut3r(tiny_config())
    return write_safetensors(model.state_dict(), model.cfg, path)


def _with_header(good: bytes, header) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    body = good[8 + n:]
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _corrupt_weights(kind: str, good: bytes) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    first, second = [k for k in header if k != "__metadata__"][:2]
    if kind == "bad-header":
        return _with_header(good, b"{not json")
    if kind == "header-2**60":
        return struct.pack("<Q", 2**60) + good[8:]
    if kind == "header-past-eof":
        return struct.pack("<Q", len(good)) + good[8:]
    if kind == "truncated":
        return good[:5]
    if kind == "overlapping-offsets":
        header[second] = {**header[second], "data_offsets": header[first]["data_offsets"]}
    elif kind == "unknown-dtype":
        header[first] = {**header[first], "dtype": "Q99"}
    elif kind == "not-an-object":
        header = [1, 2]
    return _with_header(good, header)


@pytest.mark.parametrize("kind", ["bad-header", "header-2**60", "header-past-eof", "truncated",
                                  "overlapping-offsets", "unknown-dtype", "not-an-object"])
@pytest.mark.parametrize("command", ["convert", "info"])
def test_corrupt_safetensors_gives_one_line_error(tmp_path, capsys, kind, command):
    path = _good_safetensors(tmp_path / "m.safetensors")
    path.write_bytes(_corrupt_weights(kind, path.read_bytes()))
    argv = [command, str(path)] + ([str(tmp_path / "out.safetensors")] if command == "convert" else [])
    rc, err = _cli(argv, capsys)
    assert rc == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert "is not a readable .safetensors file" in err
    assert not (tmp_path / "out.safetensors").exists()


def _sidecar_only_safetensors(path: Path) -> Path:
    """Weights without the embedded config: the sidecar is the only one (so it cannot just disagree)."""
    from safetensors.torch import load_file, save_file

    _good_safetensors(path)
    save_file(load_file(path), path)
    return path


def _sidecar_text(kind: str, good: dict) -> str:
    if kind == "config-list":
        return json.dumps({"config": []})
    if kind == "no-config":
        return json.dumps({"weights": "m.safetensors"})
    if kind == "top-level-list":
        return "[]"
    if kind == "not-json":
        return "{config:"
    if kind == "deeply-nested":
        return '{"config": ' + "[" * 100_000 + "]" * 100_000 + "}"
    field, value = {"string-for-int": ("enc_depth", "x"), "huge-depth": ("enc_depth", 5000),
                    "unknown-field": ("mystery", 1), "dict-for-tuple": ("img_size", {"h": 1})}[kind]
    return json.dumps({**good, "config": {**good["config"], field: value}})


@pytest.mark.parametrize("kind", ["config-list", "no-config", "top-level-list", "not-json", "deeply-nested",
                                  "string-for-int", "huge-depth", "unknown-field", "dict-for-tuple"])
@pytest.mark.parametrize("command", ["convert", "info"])
def test_malformed_sidecar_gives_one_line_error(tmp_path, capsys, kind, command):
    path = _sidecar_only_safetensors(tmp_path / "m.safetensors")
    sidecar = path.with_suffix(".json")
    sidecar.write_text(_sidecar_text(kind, json.loads(sidecar.read_text())))
    argv = [command, str(path)] + ([str(tmp_path / "out.safetensors")] if command == "convert" else [])
    rc, err = _cli(argv, capsys)
    assert rc == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert "m.json" in err


@pytest.mark.parametrize("embedded", ["[]", '"x"', "{", json.dumps({**tiny_config().to_dict(), "enc_depth": "x"}),
                                      json.dumps({**tiny_config().to_dict(), "dec_num_heads": 0})])
def test_malformed_embedded_config_gives_one_line_error(tmp_path, capsys, embedded):
    from safetensors.torch import load_file, save_file

    path = _good_safetensors(tmp_path / "m.safetensors")
    save_file(load_file(path), path, metadata={"streamrecon_config": embedded})
    path.with_suffix(".json").unlink()
    rc, err = _cli(["info", str(path)], capsys)
    assert rc == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
    assert "'streamrecon_config' metadata" in err


def test_oversized_sidecar_is_refused_unread(tmp_path, monkeypatch):
    from streamrecon.checkpoint import io as ckio

    path = _good_safetensors(tmp_path / "m.safetensors")
    monkeypatch.setattr(ckio, "MAX_SIDECAR_BYTES", 100)
    with pytest.raises(CheckpointError, match="larger than 100 bytes"):
        read_checkpoint(path)


def test_hostile_files_through_the_real_command_line(tmp_path):
    bad = _good_safetensors(tmp_path / "m.safetensors")
    bad.write_bytes(struct.pack("<Q", 2**60) + bad.read_bytes()[8:])
    tar = tmp_path / "old.pth"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("storages")
        info.type = tarfile.FIFOTYPE
        t.addfile(info)
    for src in (bad, tar):
        r = subprocess.run([sys.executable, "-m", "streamrecon", "convert", str(src), str(tmp_path / "o.safetensors")],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "storages").exists()


# 8. convert writes nothing until the result is verified --------------------------------------------------


def _tiny_pth(path: Path, drop: str | None = None) -> Path:
    torch.manual_seed(0)
    model = Cut3r(tiny_config())
    sd = {k: v for k, v in model.state_dict().items() if k != drop}
    return _save_official(path, model=sd, args=_official_args(model.cfg))


def test_failed_conversion_leaves_the_existing_output_untouched(tmp_path):
    out_dir = tmp_path / "out"
    dst = convert_checkpoint(_tiny_pth(tmp_path / "good.pth"), out_dir / "m.safetensors")
    before = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    assert sorted(before) == ["m.json", "m.safetensors"], "a successful conversion leaves only the pair"
    broken = _tiny_pth(tmp_path / "broken.pth", drop="pose_token")  # reads, but does not load strictly
    with pytest.raises(CheckpointMismatchError, match="pose_token"):
        convert_checkpoint(broken, dst)
    assert {p.name: p.read_bytes() for p in out_dir.iterdir()} == before, "the good pair changed or temp files remain"
    read_checkpoint(dst)


def test_failed_first_conversion_writes_nothing(tmp_path):
    broken = _tiny_pth(tmp_path / "broken.pth", drop="pose_token")
    with pytest.raises(CheckpointMismatchError):
        convert_checkpoint(broken, tmp_path / "out" / "m.safetensors")
    assert list((tmp_path / "out").iterdir()) == []


# 9. conf_thresh in checkpoint metadata -------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "abc", "", [1.0], True])
def test_non_finite_or_non_number_conf_thresh_is_an_error(value):
    info = CheckpointInfo(path="m.safetensors", format="safetensors", meta={"conf_thresh": value})
    with pytest.raises(CheckpointError, match="conf_thresh must be a"):
        resolve_conf_thresh(info)
    assert resolve_conf_thresh(info, 2.0) == 2.0  # a given threshold does not consult the metadata
    assert info.describe()["recommended_conf_thresh"] is None


def test_finite_conf_thresh_and_given_nan():
    info = CheckpointInfo(format="safetensors", meta={"conf_thresh": "1.07"})
    assert resolve_conf_thresh(info) == 1.07 and info.describe()["recommended_conf_thresh"] == 1.07
    with pytest.raises(SettingsError, match="nan"):
        resolve_conf_thresh(info, float("nan"))


def test_nan_conf_thresh_in_a_file_fails_the_load_path(tmp_path):
    torch.manual_seed(0)
    model = Cut3r(tiny_config())
    path = write_safetensors(model.state_dict(), model.cfg, tmp_path / "m.safetensors", extra_meta={"conf_thresh": "nan"})
    from streamrecon.checkpoint import load_model_info

    _, info = load_model_info(path)
    with pytest.raises(CheckpointError, match="m.safetensors metadata: conf_thresh must be a finite number"):
        resolve_conf_thresh(info)


def test_numpy_numbers_in_a_config_are_taken_as_numbers():
    """A checkpoint's args may hold numpy integers and floats: they are numbers, not a wrong type."""
    import numpy as np

    cfg = ModelConfig(dpt_feature_dim=np.int64(256), dpt_layer_dims=[np.int64(d) for d in (96, 192, 384, 768)],
                      mlp_ratio=np.float32(4.0), enc_depth=np.int32(24), rgb_head=np.True_,
                      depth_mode=("exp", np.float32(-1.0), np.float64(1.0)))
    assert type(cfg.dpt_feature_dim) is int and type(cfg.enc_depth) is int and type(cfg.mlp_ratio) is float
    assert cfg.rgb_head is True and all(type(v) is float for v in cfg.depth_mode[1:])
    json.loads(cfg.to_json())
    assert cfg.dpt_layer_dims == (96, 192, 384, 768)
    with pytest.raises(ConfigError, match="enc_depth"):
        ModelConfig(enc_depth=np.int64(5000))
