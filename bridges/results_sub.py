#!/usr/bin/env python3
"""results_sub: follow a ``streamrecon serve`` node's results (torch-free).

Prints one line per pose, keeps each stream's trajectory and writes it as TUM
(``<out-dir>/<stream>.txt``) on exit and every ``--flush-every`` poses; optionally shows every stream
in one Rerun recording (``--rerun spawn`` or ``--rerun-save file.rrd``) under ``streams/<id>/``.

Example (``streamrecon-results-sub`` is installed by ``pip install streamrecon``; the same as
``python -m streamrecon_bridges.results_sub``; the Rerun view also needs ``rerun-sdk``)::

    streamrecon-results-sub --connect tcp://127.0.0.1:5556 --out-dir trajectories
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import zmq

from streamrecon import wire
from streamrecon.netsec import curve_client

__all__ = ["ResultsSubscriber", "main"]

#: the node publishes its own status under this topic prefix (not a stream id)
NODE_TOPIC = "_node"


class ResultsSubscriber:
    """Args:
        endpoint: the node's results endpoint.
        streams: stream ids to follow (default: all); topics ``<id>/pose|geometry|status``.
        kinds: which result kinds to receive.
        curve: ``(server_public_key_file, client_secret_key_file)``.
    """

    def __init__(self, endpoint: str, streams: Optional[list[str]] = None, kinds=("pose", "geometry", "status"),
                 curve: Optional[tuple[str, str]] = None, context: Optional[zmq.Context] = None) -> None:
        self.ctx = context or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.linger = 0
        if curve:
            curve_client(self.sock, *curve)
        self.sock.connect(endpoint)
        if streams:
            for sid in streams:
                for kind in kinds:
                    self.sock.setsockopt(zmq.SUBSCRIBE, f"{sid}/{kind}".encode())
        else:
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.kinds = set(kinds)
        self.trajectories: dict[str, list] = defaultdict(list)
        self.errors = 0

    def results(self, timeout_s: Optional[float] = None) -> Iterator[tuple[str, str, dict, dict]]:
        """Yield ``(stream_id, kind, header, arrays)``; stops after ``timeout_s`` without messages."""
        while True:
            if not self.sock.poll(int(1000 * timeout_s) if timeout_s is not None else -1):
                return
            try:
                topic, header, arrays = wire.decode_result(self.sock.recv_multipart())
            except wire.WireError:
                self.errors += 1
                continue
            sid, _, kind = topic.rpartition("/")
            if sid == NODE_TOPIC:  # the node's own heartbeat (``_node/status``), not a stream
                continue
            if not wire.valid_stream_id(sid):  # it names a file: nothing from the wire leaves --out-dir
                self.errors += 1
                continue
            if kind not in self.kinds:
                continue
            if kind == "pose":
                self.trajectories[sid].append((header["stamp_ns"] / 1e9, np.asarray(header["T_wc"]).reshape(4, 4)))
            yield sid, kind, header, arrays

    def write_tum(self, out_dir: Path) -> list[Path]:
        from streamrecon.mapping.export import write_tum

        written = []
        for sid, poses in self.trajectories.items():
            path = Path(out_dir) / f"{sid}.txt"
            write_tum(path, [t for t, _ in poses], np.stack([T for _, T in poses]))
            written.append(path)
        return written

    def close(self) -> None:
        self.sock.close(linger=0)


class _RerunView:
    def __init__(self, mode: Optional[str], save: Optional[str]) -> None:
        import rerun as rr

        self.rr = rr
        self.rec = rr.RecordingStream("streamrecon_results")
        sinks = []
        if mode == "spawn":
            self.rec.spawn()
        if save:
            sinks.append(rr.FileSink(save))
        if sinks:
            self.rec.set_sinks(*sinks)
        self.rec.log("streams", rr.ViewCoordinates.RIGHT_HAND_Y_DOWN, static=True)
        self.last: dict[str, np.ndarray] = {}

    def log(self, sid: str, kind: str, header: dict, arrays: dict) -> None:
        rr = self.rr
        if "seq" in header:
            self.rec.set_time("seq", sequence=int(header["seq"]))
        if kind == "pose":
            T = np.asarray(header["T_wc"]).reshape(4, 4)
            self.rec.log(f"streams/{sid}/cam", rr.Transform3D(translation=T[:3, 3], mat3x3=T[:3, :3]))
            if sid in self.last:
                self.rec.log(f"streams/{sid}/trajectory", rr.LineStrips3D([np.stack([self.last[sid], T[:3, 3]])]))
            self.last[sid] = T[:3, 3]
        elif kind == "geometry":
            pts = arrays["points"].reshape(-1, 3).astype(np.float32)
            cols = arrays["colors"].reshape(-1, 3) if "colors" in arrays else None
            if "dynamic_mask" in arrays:  # moving objects: left out, as the node's own map does
                keep = arrays["dynamic_mask"].reshape(-1) == 0
                pts, cols = pts[keep], None if cols is None else cols[keep]
            self.rec.log(f"streams/{sid}/points", rr.Points3D(pts, colors=cols, radii=-1.0))

    def close(self) -> None:
        self.rec.flush(timeout_sec=5.0)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connect", default="tcp://127.0.0.1:5556", help="the node's results endpoint")
    ap.add_argument("--stream", action="append", help="follow only these streams (repeatable)")
    ap.add_argument("--out-dir", default="trajectories", help="TUM trajectories go here")
    ap.add_argument("--flush-every", type=int, default=100, help="rewrite the TUM files every N poses")
    ap.add_argument("--quiet", action="store_true", help="do not print every pose")
    ap.add_argument("--rerun", choices=["spawn", "none"], default="none")
    ap.add_argument("--rerun-save", help="record the multi-stream Rerun view to this .rrd")
    ap.add_argument("--timeout", type=float, default=None, help="exit after this many seconds without results")
    ap.add_argument("--curve-server-key")
    ap.add_argument("--curve-client-key")
    args = ap.parse_args(argv)
    if args.rerun != "none" or args.rerun_save:
        try:
            import rerun  # noqa: F401
        except ImportError:
            print('results_sub: --rerun/--rerun-save need rerun-sdk: pip install "rerun-sdk>=0.41,<0.42" '
                  '(or "streamrecon[node]")', file=sys.stderr)
            return 2
    curve = (args.curve_server_key, args.curve_client_key) if args.curve_server_key else None
    sub = ResultsSubscriber(args.connect, args.stream, curve=curve)
    view = _RerunView(args.rerun if args.rerun != "none" else None, args.rerun_save) \
        if (args.rerun != "none" or args.rerun_save) else None
    n = 0
    stopped = _stop_on_sigterm()
    try:
        for sid, kind, header, arrays in sub.results(args.timeout):
            if view is not None:
                view.log(sid, kind, header, arrays)
            if kind == "pose":
                n += 1
                if not args.quiet:
                    t = np.asarray(header["T_wc"]).reshape(4, 4)[:3, 3]
                    print(f"{sid} seq {header['seq']} t {header['stamp_ns'] / 1e9:.3f} "
                          f"xyz {t[0]:+.3f} {t[1]:+.3f} {t[2]:+.3f} latency {header['latency_ms']:.1f} ms", flush=True)
                if args.flush_every and n % args.flush_every == 0:
                    sub.write_tum(Path(args.out_dir))
            elif kind == "status" and not args.quiet and header.get("closed"):
                print(f"{sid} closed: {header.get('processed')} frames", flush=True)
    except KeyboardInterrupt:
        stopped.append(signal.SIGINT)
    finally:
        restore = _ignore_sigterm()  # a second SIGTERM must not cut the trajectories short
        files = sub.write_tum(Path(args.out_dir))
        if view is not None:
            view.close()
        sub.close()
        bad = f", {sub.errors} malformed messages skipped" if sub.errors else ""
        print(f"results_sub: {n} poses{bad}, wrote {', '.join(map(str, files)) or 'nothing'}", file=sys.stderr)
        restore()
    return 128 + int(stopped[0]) if stopped else 0


def _ignore_sigterm():
    """Ignore SIGTERM from here on; returns the function that puts the handler from before main() back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return lambda: signal.signal(signal.SIGTERM, _PREVIOUS.get(signal.SIGTERM, signal.SIG_DFL))


_PREVIOUS: dict = {}


def _stop_on_sigterm() -> list:
    """SIGTERM (systemd, docker stop, kill) ends the loop like Ctrl-C, so the trajectories are still
    written; the returned list receives the signal that stopped us."""
    stopped: list = []

    def handler(signum, _frame):
        stopped.append(signal.Signals(signum))
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        _PREVIOUS[signal.SIGTERM] = signal.signal(signal.SIGTERM, handler)
    return stopped


if __name__ == "__main__":
    sys.exit(main())
