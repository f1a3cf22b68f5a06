"""Model commands: ``convert`` (official .pth -> .safetensors), ``info``, ``parity`` (golden sets)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import UserError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an official CUT3R .pth to .safetensors + JSON config",
                       description="Read an official checkpoint without running code from it, write OUT.safetensors "
                                   "and OUT.json (the config), and verify the result loads strictly and matches the "
                                   "source; an existing OUT pair is replaced only once the new one is verified.")
    p.add_argument("src", type=Path, help="input checkpoint (.pth)")
    p.add_argument("dst", type=Path, help="output path ending in .safetensors")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="store weights in this dtype (default: as in the source)")
    p.set_defaults(handler=_convert)

    p = sub.add_parser("info", help="print a checkpoint's architecture and size")
    p.add_argument("checkpoint", type=Path)
    p.set_defaults(handler=_info)

    p = sub.add_parser("parity", help="replay golden sets and print the worst normalised error of each")
    p.add_argument("sets", type=Path, nargs="*", help="golden set directories (default: every set under --root)")
    p.add_argument("--root", type=Path, default=Path("../shared/golden"), help="where to look for sets")
    p.add_argument("--verbose-arrays", action="store_true", help="print every array's error")
    p.set_defaults(handler=_parity)


def _read(path: Path):
    from ..checkpoint import CheckpointError, UnsafeCheckpointError, read_checkpoint

    if path.is_dir():
        raise UserError(f"{path} is a folder; give the checkpoint file (.pth or .safetensors)")
    try:
        return read_checkpoint(path)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except (CheckpointError, UnsafeCheckpointError, ValueError) as e:
        raise UserError(f"cannot use {path}: {e}") from None


def _convert(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import CheckpointError, UnsafeCheckpointError, convert_checkpoint

    if args.dst.suffix != ".safetensors":
        raise UserError(f"output must end in .safetensors, got {args.dst}")
    if not args.src.exists():
        raise UserError(f"checkpoint not found: {args.src}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        out = convert_checkpoint(args.src, args.dst, dtype=dtype)
    except (CheckpointError, UnsafeCheckpointError, ValueError) as e:
        raise UserError(f"cannot convert {args.src}: {e}") from None
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _info(args: argparse.Namespace) -> int:
    ck = _read(args.checkpoint)
    unique = {}
    for v in ck.state_dict.values():
        unique.setdefault((v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)), v.numel())
    info = {
        "format": ck.meta.get("format"),
        "entries": len(ck.state_dict),
        "parameters": int(sum(unique.values())),
        "config": ck.config.to_dict(),
    }
    json.dump(info, sys.stdout, indent=1)
    print()
    return 0


_SET_FILES = ("vectors.npz", "preprocess.npz", "policy.json")


def _parity(args: argparse.Namespace) -> int:
    from ..parity import ParityError, discover_sets, run_set

    sets = []
    for given in args.sets:  # a set, or a folder of sets
        inner = discover_sets(given, extra="") if not any((given / f).exists() for f in _SET_FILES) else []
        sets += inner or [given]
    sets = sets or discover_sets(args.root)
    if not sets:
        raise UserError(f"no golden sets given and none found under {args.root}")
    failed = 0
    for set_dir in sets:
        try:
            report = run_set(set_dir)
        except ParityError as e:
            raise UserError(str(e)) from None
        print(report.summary())
        if args.verbose_arrays:
            for k, v in sorted(report.errors.items()):
                print(f"  {k}: {v:.3g}")
        for f in report.failures:
            print(f"  FAIL {f}")
        failed += bool(report.failures)
    return 1 if failed else 0
