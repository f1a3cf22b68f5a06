"""Feed hostile and corrupt checkpoint files to the real command line and report what each one cost:
one line per (class, command), then a summary.

    python tools/attack_checkpoints.py --json attack_checkpoints.json
    python tools/attack_checkpoints.py --only tar-fifo,zip-bomb --timeout 60 --keep

Every file is built in a fresh temporary directory (small on disk: the zip bomb is ~2 MB of deflate
that declares 2.2 GB, written streaming so this tool never holds it in memory). Each command runs in
its own subprocess (``python -m streamrecon convert FILE OUT.safetensors``, ``info FILE``, and for a
few classes ``run <clip> --weights FILE``) with a wall-clock limit; a run past it is a hang (killed).
Per run: exit code, wall seconds, the child's own peak RSS (``ru_maxrss`` from ``os.wait4`` on that
child, i.e. what ``/usr/bin/time -f %M`` reports), whether stderr holds a ``Traceback``, its last line
(the temporary directory's path shown as ``$TMP``, truncated to 160 characters), what a failed
``convert`` left in the output folder (``OUT.safetensors``, ``OUT.json``, staging folders), files that
appeared outside the temporary directory (new entries in the system temp folder, the repository and
the home folder; for the tar symlink class, the link's target) and files the child left in its own
``TMPDIR`` (where torch's legacy reader would extract tar members). Another process writing to those
folders at the same time shows up too: the paths are listed so that they can be told apart.

Classes: legacy tar checkpoints with FIFO / symlink-outside / character-device members; zip
checkpoints whose pickle calls ``bytearray(2_000_000_000)`` or ``numpy.ndarray`` with a 128 GiB
shape; a deflated ``data.pkl`` that inflates to 2.2 GB; a DAG of shared lists of depth 22 in the
config; a zero-stride ``torch.zeros(1).expand(10**9)`` tensor; ``enc_depth=5000`` in a model string
and in a sidecar; corrupt ``.safetensors`` headers (length 2**60, past EOF, overlapping offsets,
unknown dtype); malformed sidecars (``{"config": []}``, a string for an int); ``conf_thresh: "nan"``
metadata. A ``baseline`` class (a valid tiny checkpoint) gives the cost of a normal run for scale.

Measurements, not a test: the figures go in the closing note of a hardening change.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from streamrecon.checkpoint import write_safetensors  # noqa: E402
from streamrecon.config import ModelConfig  # noqa: E402

_SHARED = REPO.parent / "shared"
_DEFAULT_CLIP = _SHARED / "data" / "cut3r_examples" / "003"
_MiB = 2**20
_CHUNK = 16 * _MiB


# the hostile files ---------------------------------------------------------------------------------


def _tiny_config(**kw: Any) -> ModelConfig:
    """A ~3 MB model of the real architecture (the shape the tests use)."""
    base = dict(enc_embed_dim=64, enc_depth=2, enc_num_heads=4, dec_embed_dim=32, dec_depth=4, dec_num_heads=2,
                state_dec_num_heads=4, state_size=12, local_mem_size=8, head_type="dpt", dpt_feature_dim=8,
                dpt_last_dim=8, dpt_layer_dims=(4, 8, 8, 16), img_size=(64, 64))
    base.update(kw)
    return ModelConfig(**base)


def _official_args(cfg: ModelConfig, model_string: str | None = None) -> dict:
    return {"model": model_string or cfg.to_model_string(), "dpt_feature_dim": cfg.dpt_feature_dim,
            "dpt_last_dim": cfg.dpt_last_dim, "dpt_layer_dims": list(cfg.dpt_layer_dims)}


def _save_official(path: Path, model: dict | None = None, args: dict | None = None, **extra: Any) -> Path:
    """An official-layout ``.pth`` (``model`` / ``args`` / ``epoch``) with a valid tiny model string."""
    payload = {"model": {"w": torch.zeros(2)} if model is None else model,
               "args": _official_args(_tiny_config()) if args is None else args, "epoch": 0, **extra}
    torch.save(payload, path)
    return path


class _Calls:
    """Pickles as ``fn(*args)``: the unpickler is asked to call ``fn``."""

    def __init__(self, fn: Callable, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)


def _legacy_tar(path: Path, member_type: bytes, linkname: str = "") -> Path:
    """A torch < 1.6 tar checkpoint whose ``storages`` / ``tensors`` / ``pickle`` members are special files."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("storages", "tensors", "pickle"):
            info = tarfile.TarInfo(name)
            info.type = member_type
            info.linkname = linkname
            if member_type == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 5  # /dev/zero: endless if extracted and read
            tar.addfile(info)
    return path


def _zip_bomb(src: Path, dst: Path, inflated: int) -> Path:
    """``src`` (a torch zip) with ``data.pkl`` deflated and zero-padded after its STOP to ``inflated``
    bytes; written in chunks, so the padding is never in memory."""
    zero = bytes(_CHUNK)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if not info.filename.endswith("/data.pkl"):
                zout.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED)
                continue
            with zout.open(info.filename, "w", force_zip64=True) as rec:
                rec.write(data)
                left = inflated - len(data)
                while left > 0:
                    n = min(left, _CHUNK)
                    rec.write(zero if n == _CHUNK else zero[:n])
                    left -= n
    return dst


def _dag(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node, node]  # 2**depth paths, depth + 1 objects
    return node


def _with_header(good: bytes, header: Any) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + good[8 + n:]


def _corrupt_safetensors(kind: str, good: bytes) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8:8 + n])
    first, second = [k for k in header if k != "__metadata__"][:2]
    if kind == "header-2**60":
        return struct.pack("<Q", 2**60) + good[8:]
    if kind == "header-past-eof":
        return struct.pack("<Q", len(good)) + good[8:]
    if kind == "overlapping-offsets":
        header[second] = {**header[second], "data_offsets": header[first]["data_offsets"]}
    elif kind == "unknown-dtype":
        header[first] = {**header[first], "dtype": "Q99"}
    else:
        raise ValueError(kind)
    return _with_header(good, header)


class _Base:
    """The valid tiny model every safetensors class starts from (built once)."""

    def __init__(self, root: Path) -> None:
        from safetensors.torch import load_file, save_file

        from streamrecon.models import Cut3r

        torch.manual_seed(0)
        self.model = Cut3r(_tiny_config())
        self.dir = root / "_base"
        self.dir.mkdir()
        self.safetensors = write_safetensors(self.model.state_dict(), self.model.cfg, self.dir / "m.safetensors")
        self.bytes = self.safetensors.read_bytes()
        self.sidecar = json.loads(self.safetensors.with_suffix(".json").read_text())
        bare = self.dir / "bare.safetensors"  # no embedded config: the sidecar is the only one
        save_file(load_file(self.safetensors), bare)
        self.bare = bare.read_bytes()

    def pair(self, folder: Path, weights: bytes, sidecar: str | None = None) -> Path:
        path = folder / "m.safetensors"
        path.write_bytes(weights)
        path.with_suffix(".json").write_text(json.dumps(self.sidecar) if sidecar is None else sidecar)
        return path

    def with_sidecar_config(self, folder: Path, config: Any) -> Path:
        return self.pair(folder, self.bare, json.dumps({**self.sidecar, "config": config}))


@dataclass
class Case:
    name: str
    what: str
    build: Callable[[Path], Path]
    run: bool = False  # also try ``streamrecon run --weights FILE``
    control: bool = False  # the valid baseline, not a hostile file


def _cases(base: _Base, outside_target: Path, bomb_bytes: int) -> list[Case]:
    cfg = _tiny_config()

    def tiny_pth(folder: Path) -> Path:
        return _save_official(folder / "good.pth", model=base.model.state_dict(), args=_official_args(cfg))

    def bomb(folder: Path) -> Path:
        src = _save_official(folder / "src.pth")
        out = _zip_bomb(src, folder / "bomb.pth", bomb_bytes)
        src.unlink()
        return out

    deep_string = cfg.to_model_string().replace("enc_depth=2", "enc_depth=5000")
    assert deep_string != cfg.to_model_string()
    conf = dict(base.sidecar["config"])
    return [
        Case("baseline", "valid tiny official .pth (control)", tiny_pth, run=False, control=True),
        Case("tar-fifo", "legacy tar, FIFO members", lambda d: _legacy_tar(d / "old.pth", tarfile.FIFOTYPE), run=True),
        Case("tar-symlink", f"legacy tar, symlinks -> {outside_target}",
             lambda d: _legacy_tar(d / "old.pth", tarfile.SYMTYPE, str(outside_target))),
        Case("tar-chrdev", "legacy tar, char-device (1,5) members", lambda d: _legacy_tar(d / "old.pth", tarfile.CHRTYPE)),
        Case("pickle-bytearray", "pickle calls bytearray(2_000_000_000)",
             lambda d: _save_official(d / "alloc.pth", extra=_Calls(bytearray, 2_000_000_000))),
        Case("pickle-ndarray", "pickle calls numpy.ndarray((2**17, 2**17), 'f8') (128 GiB)",
             lambda d: _save_official(d / "alloc.pth", extra=_Calls(np.ndarray, (2**17, 2**17), "f8"))),
        Case("zip-bomb", f"data.pkl deflated, inflates to {bomb_bytes} bytes", bomb),
        Case("pickle-dag22", "config holds a DAG of shared lists, depth 22 (2**23 nodes expanded)",
             lambda d: _save_official(d / "dag.pth", args={**_official_args(cfg), "junk": _dag(22)})),
        Case("expand-1e9", "tensor torch.zeros(1).expand(10**9) (stride 0, 4 GB if materialised)",
             lambda d: _save_official(d / "exp.pth", model={"w": torch.zeros(1).expand(10**9)})),
        Case("model-string-depth", "args.model string with enc_depth=5000",
             lambda d: _save_official(d / "deep.pth", args=_official_args(cfg, deep_string))),
        Case("sidecar-depth", "sidecar config enc_depth=5000 (no embedded config)",
             lambda d: base.with_sidecar_config(d, {**conf, "enc_depth": 5000})),
        Case("st-header-2**60", ".safetensors header length 2**60",
             lambda d: base.pair(d, _corrupt_safetensors("header-2**60", base.bytes))),
        Case("st-header-past-eof", ".safetensors header length past EOF",
             lambda d: base.pair(d, _corrupt_safetensors("header-past-eof", base.bytes))),
        Case("st-overlap", ".safetensors two tensors with the same data_offsets",
             lambda d: base.pair(d, _corrupt_safetensors("overlapping-offsets", base.bytes))),
        Case("st-dtype", ".safetensors unknown dtype 'Q99'",
             lambda d: base.pair(d, _corrupt_safetensors("unknown-dtype", base.bytes))),
        Case("sidecar-config-list", 'sidecar {"config": []}',
             lambda d: base.pair(d, base.bare, json.dumps({"config": []}))),
        Case("sidecar-str-int", 'sidecar config enc_depth: "x"',
             lambda d: base.with_sidecar_config(d, {**conf, "enc_depth": "x"})),
        Case("conf-nan", 'safetensors metadata conf_thresh: "nan"',
             lambda d: write_safetensors(base.model.state_dict(), base.model.cfg, d / "m.safetensors",
                                         extra_meta={"conf_thresh": "nan"}), run=True),
    ]


# running one command -------------------------------------------------------------------------------


def _entries(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir()}
    except OSError:
        return set()


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.is_dir() else []


def _last_line(text: str, limit: int = 160) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else ""


def run_one(argv: list[str], cwd: Path, logs: Path, timeout: float, watch: list[Path], root: Path) -> dict:
    """Run ``argv`` in its own session; its exit code, wall time, peak RSS (this child's own, from
    ``wait4``), stderr and the files that appeared in ``watch`` outside ``root``."""
    scratch = cwd / "tmpdir"
    scratch.mkdir(parents=True, exist_ok=True)
    before = {d: _entries(d) for d in watch}
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONWARNINGS": "ignore"}
    err_path, out_path = logs / "stderr.txt", logs / "stdout.txt"
    with open(err_path, "wb") as err, open(out_path, "wb") as out:
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        hang = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                hang = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything the child left running in its session
    except (ProcessLookupError, PermissionError):
        pass
    stderr = err_path.read_text(errors="replace")
    shown = stderr.replace(str(root), "$TMP")  # the temp dir's path would fill the 160 characters
    outside = sorted(str(d / n) for d in watch for n in _entries(d) - before[d]
                     if not str(d / n).startswith(str(root)))
    return {"argv": argv, "rc": proc.returncode, "hang": hang, "wall_s": round(wall, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "traceback": "Traceback" in stderr,
            "stderr_lines": len(stderr.strip().splitlines()), "last_stderr": _last_line(shown), "stderr_tail": shown[-2000:],
            "outside": outside, "tmpdir_left": _tree(scratch)}


# the report -----------------------------------------------------------------------------------------


@dataclass
class Report:
    rows: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        hostile = [r for r in self.rows if not r["control"]]
        return {
            "files_tried": sum(not f["control"] for f in self.files),
            "runs": len(hostile),
            "hangs": sum(r["hang"] for r in hostile),
            "tracebacks": sum(r["traceback"] for r in hostile),
            "nonzero_exit": sum(r["rc"] != 0 for r in hostile),
            "max_peak_rss_mib": max((r["peak_rss_mib"] for r in hostile), default=0.0),
            "max_peak_rss_case": max(hostile, key=lambda r: r["peak_rss_mib"])["case"] if hostile else None,
            "baseline_peak_rss_mib": max((r["peak_rss_mib"] for r in self.rows if r["control"]), default=None),
            "max_wall_s": max((r["wall_s"] for r in hostile), default=0.0),
            "files_written_outside": sorted({p for r in self.rows for p in r["outside"]}),
            "failed_convert_left_output": sorted(f"{r['case']}: {x}" for r in hostile
                                                 if r["command"] == "convert" and r["rc"] != 0 for x in r["out_left"]),
            "tmpdir_left": sorted(f"{r['case']}/{r['command']}: {x}" for r in hostile for x in r["tmpdir_left"]),
        }


_HEAD = (f"{'class':<20} {'command':<8} {'rc':>4} {'wall_s':>7} {'rss_MiB':>8} {'hang':>4} {'tb':>3} {'left':>4} "
         f"{'outside':>7}  last stderr line")


def _line(r: dict) -> str:
    left = "-" if r["command"] != "convert" else str(len(r["out_left"]))
    return (f"{r['case']:<20} {r['command']:<8} {r['rc']:>4} {r['wall_s']:>7.2f} {r['peak_rss_mib']:>8.1f} "
            f"{'HANG' if r['hang'] else '-':>4} {'TB' if r['traceback'] else '-':>3} {left:>4} "
            f"{len(r['outside']):>7}  {r['last_stderr']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the full report here")
    ap.add_argument("--timeout", type=float, default=120.0, help="wall-clock limit per command, s (past it: a hang)")
    ap.add_argument("--only", default="", help="comma-separated class names (default: all)")
    ap.add_argument("--clip", type=Path, default=_DEFAULT_CLIP, help="image folder for the `run` attempts")
    ap.add_argument("--bomb-bytes", type=int, default=2_200_000_000, help="what the zip bomb's data.pkl inflates to")
    ap.add_argument("--no-run", action="store_true", help="skip the `streamrecon run --weights` attempts")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (its path is printed)")
    args = ap.parse_args(argv)

    system_tmp = Path(tempfile.gettempdir()).resolve()
    root = Path(tempfile.mkdtemp(prefix="attack_checkpoints.")).resolve()
    outside_target = system_tmp / f"streamrecon-attack-{os.getpid()}-symlink-target"
    watch = sorted({system_tmp, REPO, Path.home().resolve(), root.parent})
    report = Report()
    try:
        base = _Base(root)
        cases = _cases(base, outside_target, args.bomb_bytes)
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {c.name for c in cases}
            if unknown:
                ap.error(f"unknown classes {sorted(unknown)}; known: {[c.name for c in cases]}")
            cases = [c for c in cases if c.name in wanted or c.control]
        print(f"temp dir {root}; timeout {args.timeout:g} s per command\n")
        print(_HEAD)
        for case in cases:
            folder = root / case.name / "input"
            folder.mkdir(parents=True)
            t0 = time.monotonic()
            path = case.build(folder)
            build_s = time.monotonic() - t0
            on_disk = sum(p.stat().st_size for p in folder.iterdir())
            report.files.append({"case": case.name, "what": case.what, "file": path.name, "bytes_on_disk": on_disk,
                                 "build_s": round(build_s, 2), "control": case.control})
            inputs_before = _entries(folder)
            commands = [("convert", ["convert", str(path), "OUT.safetensors"]), ("info", ["info", str(path)])]
            if case.run and not args.no_run:
                commands.append(("run", ["run", str(args.clip.resolve()), "--weights", str(path), "--output-dir",
                                         "runout", "--no-progress"]))
            for command, cli in commands:
                cwd = root / case.name / command
                logs = root / case.name / f"{command}.logs"
                cwd.mkdir()
                logs.mkdir()
                row = run_one([sys.executable, "-m", "streamrecon", *cli], cwd, logs, args.timeout, watch, root)
                if outside_target.exists() or outside_target.is_symlink():
                    row["outside"].append(f"{outside_target} (the tar symlink target)")
                    outside_target.unlink()  # this tool's own attack file: take it away again
                row["out_left"] = sorted(p for p in _tree(cwd) if p != "tmpdir" and not p.startswith("tmpdir/"))
                row["input_dir_new"] = sorted(_entries(folder) - inputs_before)
                row.update(case=case.name, command=command, control=case.control, bytes_on_disk=on_disk)
                report.rows.append(row)
                print(_line(row), flush=True)
        s = report.summary()
        print("\nfiles on disk: " + ", ".join(f"{f['case']} {f['bytes_on_disk'] / 1024:.0f} kB" for f in report.files))
        print(f"\nsummary: {s['files_tried']} hostile files, {s['runs']} runs; hangs {s['hangs']}; "
              f"tracebacks {s['tracebacks']}; non-zero exits {s['nonzero_exit']}; max peak RSS "
              f"{s['max_peak_rss_mib']:.1f} MiB ({s['max_peak_rss_case']}; baseline {s['baseline_peak_rss_mib']} MiB); "
              f"max wall {s['max_wall_s']:.2f} s")
        print(f"files written outside the temp dir: {len(s['files_written_outside'])} {s['files_written_outside'] or ''}")
        print(f"failed converts that left output: {len(s['failed_convert_left_output'])} {s['failed_convert_left_output'] or ''}")
        print(f"files left in a child's TMPDIR: {len(s['tmpdir_left'])} {s['tmpdir_left'] or ''}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"summary": s, "files": report.files, "runs": report.rows,
                                             "timeout_s": args.timeout, "temp_dir": str(root)}, indent=1) + "\n")
            print(f"wrote {args.json}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
