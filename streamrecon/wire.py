"""streamrecon wire protocol v1 (docs/PROTOCOL.md): ZeroMQ multipart, JSON header + binary parts.

Torch-free: this module needs numpy and json only (OpenCV only to encode/decode JPEG/PNG), so camera
bridges can import it alone. Nothing is ever pickled.

Frames in (ingest socket): ``[header_json, payload]``. Header fields: ``v`` (1), ``stream_id``,
``seq``, ``stamp_ns``, ``encoding`` (``rgb8``/``bgr8``/``mono8``/``jpeg``/``png``), ``width``,
``height``, ``step`` (bytes per row, raw encodings), optional ``K`` (3x3 or ``[fx, fy, cx, cy]``),
``reset``, ``ack``, ``lossless``, ``session``. imagezmq's ``[{"msg", "dtype", "shape"}, raw]`` and
``[{"msg"}, jpeg]`` are read too.

Results out (PUB): ``[topic, header_json, *arrays]`` with topics ``<stream_id>/pose``,
``<stream_id>/geometry``, ``<stream_id>/status``. Control (request/reply): ``[request_json, *arrays]``
-> ``[reply_json, *arrays]``; arrays are described in the JSON under ``"arrays"``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

__all__ = [
    "PROTOCOL_VERSION", "ENCODINGS", "WireError", "ERROR_KINDS", "FrameMessage", "encode_frame", "decode_frame",
    "decode_image", "valid_stream_id", "stream_id_from_imagezmq", "encode_result", "decode_result",
    "encode_request", "decode_request", "encode_reply", "decode_reply", "pack_arrays", "unpack_arrays",
    "compressed_size",
]

PROTOCOL_VERSION = 1
ENCODINGS = {"rgb8": 3, "bgr8": 3, "mono8": 1, "jpeg": 0, "png": 0}
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_FRAME_BYTES = 64 * 2**20
MAX_DIM = 16384
ERROR_KINDS = ("bad_parts", "bad_json", "bad_version", "missing_field", "bad_field", "unknown_encoding",
               "bad_size", "truncated", "too_large", "undecodable", "bad_stream_id")
_STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


class WireError(ValueError):
    """A message that breaks the protocol. ``kind`` is one of :data:`ERROR_KINDS`; ``stream_id`` is
    set when the header named a valid stream (so the error can be counted on that stream)."""

    def __init__(self, kind: str, message: str, stream_id: Optional[str] = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.stream_id = kind, stream_id
        self.seq: Optional[int] = None  # the header's seq when it had a valid one (the sender matches acks by it)


def valid_stream_id(sid: Any) -> bool:
    """Letters, digits and ``. _ : @ -``, 1..128 characters, starting with a letter or digit."""
    return isinstance(sid, str) and bool(_STREAM_ID.fullmatch(sid))


def stream_id_from_imagezmq(msg: Any) -> str:
    """imagezmq ``msg`` -> stream id: the text before the first ``|``, trimmed, spaces -> ``_``."""
    if not isinstance(msg, str):
        raise WireError("bad_stream_id", f"imagezmq msg must be text, got {type(msg).__name__}")
    sid = msg.split("|", 1)[0].strip().replace(" ", "_")
    if not valid_stream_id(sid):
        raise WireError("bad_stream_id", f"imagezmq msg {msg[:40]!r} does not give a valid stream id")
    return sid


@dataclass
class FrameMessage:
    """A validated frame message (the payload is not decoded yet)."""

    stream_id: str
    seq: Optional[int]
    stamp_ns: int
    encoding: str
    width: Optional[int]
    height: Optional[int]
    step: Optional[int]
    payload: Any
    K: Optional[np.ndarray] = None
    reset: bool = False
    ack: bool = False
    lossless: Optional[bool] = None
    session: Optional[str] = None
    origin: str = "streamrecon"
    extra: dict = field(default_factory=dict)

    def image(self) -> np.ndarray:
        """Decode to ``(H, W, 3)`` uint8 RGB (raises :class:`WireError` ``undecodable``)."""
        return decode_image(self)


def _now_ns() -> int:
    return time.time_ns()


def _as_buffer(part: Any) -> memoryview:
    """Bytes view of a message part (bytes, zmq.Frame, numpy array...)."""
    view = part.buffer if hasattr(part, "buffer") else memoryview(part)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _bytes_len(part: Any) -> int:
    return _as_buffer(part).nbytes


def _intrinsics(K: Any, sid: str) -> Optional[np.ndarray]:
    if K is None:
        return None
    try:
        a = np.asarray(K, dtype=np.float64)
    except (TypeError, ValueError):
        raise WireError("bad_field", "K must be numbers", sid) from None
    if a.shape == (4,):
        fx, fy, cx, cy = a
        a = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    if a.shape != (3, 3) or not np.isfinite(a).all():
        raise WireError("bad_field", "K must be 3x3 or [fx, fy, cx, cy] and finite", sid)
    return a


def _int_field(h: dict, name: str, sid: Optional[str], lo: int = 0, hi: int = 2**63 - 1, required: bool = True):
    if name not in h:
        if required:
            raise WireError("missing_field", f"header lacks {name!r}", sid)
        return None
    v = h[name]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise WireError("bad_field", f"{name}={v!r} must be an integer in [{lo}, {hi}]", sid)
    return v


def decode_frame(parts: Sequence[Any], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> FrameMessage:
    """Validate a 2-part frame message (ours or imagezmq's); nothing is decoded or allocated from
    declared sizes before they are checked against ``max_frame_bytes``. Any malformed input raises
    :class:`WireError` (never another exception type)."""
    seen: dict[str, Any] = {}
    try:
        return _decode_frame(parts, max_frame_bytes, seen)
    except WireError as e:
        e.seq = seen.get("seq")
        raise
    except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as e:  # odd field types
        err = WireError("bad_field", f"{type(e).__name__}: {str(e)[:80]}")
        err.seq = seen.get("seq")
        raise err from None


def _decode_frame(parts: Sequence[Any], max_frame_bytes: int, seen: dict) -> FrameMessage:
    if len(parts) != 2:
        raise WireError("bad_parts", f"expected 2 parts (header, payload), got {len(parts)}")
    raw_header, payload = parts
    if _bytes_len(raw_header) > MAX_HEADER_BYTES:
        raise WireError("too_large", f"header of {_bytes_len(raw_header)} bytes")
    try:
        h = json.loads(bytes(_as_buffer(raw_header)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError("bad_json", f"header is not JSON: {str(e)[:80]}") from None
    if not isinstance(h, dict):
        raise WireError("bad_json", "header must be a JSON object")
    if isinstance(h.get("seq"), int) and not isinstance(h.get("seq"), bool) and h["seq"] >= 0:
        seen["seq"] = h["seq"]
    n = _bytes_len(payload)
    if n > max_frame_bytes:
        raise WireError("too_large", f"payload of {n} bytes exceeds {max_frame_bytes}")
    if "stream_id" not in h and "msg" in h:
        return _decode_imagezmq(h, payload, n, max_frame_bytes)
    sid = h.get("stream_id")
    if "stream_id" not in h:
        raise WireError("missing_field", "header lacks 'stream_id'")
    if not valid_stream_id(sid):
        raise WireError("bad_stream_id", f"stream_id {str(sid)[:40]!r} is not valid")
    if h.get("v") != PROTOCOL_VERSION:
        raise WireError("bad_version", f"protocol version {h.get('v')!r} (this node speaks {PROTOCOL_VERSION})", sid)
    enc = h.get("encoding")
    if enc is None:
        raise WireError("missing_field", "header lacks 'encoding'", sid)
    if not isinstance(enc, str) or enc not in ENCODINGS:
        raise WireError("unknown_encoding", f"encoding {str(enc)[:20]!r}; known: {', '.join(ENCODINGS)}", sid)
    seq = _int_field(h, "seq", sid)
    stamp = _int_field(h, "stamp_ns", sid, required=False)
    compressed = ENCODINGS[enc] == 0
    width = _int_field(h, "width", sid, 1, MAX_DIM, required=not compressed)
    height = _int_field(h, "height", sid, 1, MAX_DIM, required=not compressed)
    step = None
    if not compressed:
        row = width * ENCODINGS[enc]
        step = _int_field(h, "step", sid, row, row + 4096, required=False) or row
        expected = step * height
        if expected > max_frame_bytes:
            raise WireError("too_large", f"{width}x{height} {enc} needs {expected} bytes > {max_frame_bytes}", sid)
        if n < expected:
            raise WireError("truncated", f"payload has {n} of {expected} bytes", sid)
        if n > expected:
            raise WireError("bad_size", f"payload has {n} bytes, {width}x{height} {enc} (step {step}) needs {expected}", sid)
    elif n == 0:
        raise WireError("truncated", "empty compressed payload", sid)
    else:
        cw, ch = compressed_size(payload, enc, max_frame_bytes, sid)
        if (width and cw != width) or (height and ch != height):
            raise WireError("bad_size", f"the {enc} is {cw}x{ch}, the header says {width}x{height}", sid)
    for flag in ("reset", "ack", "lossless"):
        if flag in h and not isinstance(h[flag], bool):
            raise WireError("bad_field", f"{flag} must be true or false", sid)
    session = h.get("session")
    if session is not None and not (isinstance(session, str) and len(session) <= 64):
        raise WireError("bad_field", "session must be a short string", sid)
    return FrameMessage(stream_id=sid, seq=seq, stamp_ns=stamp if stamp is not None else _now_ns(), encoding=enc,
                        width=width, height=height, step=step, payload=payload, K=_intrinsics(h.get("K"), sid),
                        reset=bool(h.get("reset", False)), ack=bool(h.get("ack", False)), lossless=h.get("lossless"),
                        session=session)


def _decode_imagezmq(h: dict, payload: Any, n: int, max_frame_bytes: int) -> FrameMessage:
    sid = stream_id_from_imagezmq(h["msg"])
    if "dtype" not in h and "shape" not in h:  # send_jpg: JPEG (PNG is taken too) bytes
        if n == 0:
            raise WireError("truncated", "empty imagezmq jpg payload", sid)
        enc = "png" if bytes(_as_buffer(payload)[:8]) == _MAGIC["png"] else "jpeg"
        compressed_size(payload, enc, max_frame_bytes, sid)
        return FrameMessage(sid, None, _now_ns(), enc, None, None, None, payload, origin="imagezmq")
    shape, dtype = h.get("shape"), h.get("dtype")
    if dtype != "uint8":
        raise WireError("unknown_encoding", f"imagezmq dtype {str(dtype)[:20]!r} (only uint8 images)", sid)
    if not (isinstance(shape, list) and len(shape) in (2, 3) and all(isinstance(d, int) and not isinstance(d, bool)
                                                                        and d >= 1 for d in shape)):
        raise WireError("bad_field", f"imagezmq shape {str(shape)[:40]} must be [H, W] or [H, W, 3]", sid)
    if len(shape) == 3 and shape[2] != 3:
        raise WireError("unknown_encoding", f"imagezmq images need 1 or 3 channels, got {shape[2]}", sid)
    if max(shape[:2]) > MAX_DIM:
        raise WireError("too_large", f"imagezmq image {shape}", sid)
    enc = "bgr8" if len(shape) == 3 else "mono8"
    expected = shape[0] * shape[1] * ENCODINGS[enc]
    if n != expected:
        raise WireError("truncated" if n < expected else "bad_size", f"imagezmq payload {n} bytes for shape {shape}", sid)
    return FrameMessage(sid, None, _now_ns(), enc, shape[1], shape[0], shape[1] * ENCODINGS[enc], payload,
                        origin="imagezmq")


_MAGIC = {"jpeg": b"\xff\xd8\xff", "png": b"\x89PNG\r\n\x1a\n"}
_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG"}


def compressed_size(payload: Any, encoding: str, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                    stream_id: Optional[str] = None) -> tuple[int, int]:
    """``(width, height)`` of a JPEG/PNG payload read from its header alone (nothing is decoded), checked
    like a raw frame: sides <= :data:`MAX_DIM` and ``width x height x 3 <= max_frame_bytes`` -- so a
    small file that would decode to gigabytes (a decompression bomb) is refused before any allocation.
    The payload must be the format its encoding names (OpenCV would decode TIFF, WebP... too)."""
    buf = _as_buffer(payload)
    if bytes(buf[: len(_MAGIC[encoding])]) != _MAGIC[encoding]:
        raise WireError("undecodable", f"the payload is not a {encoding} file (bad signature)", stream_id)
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb warning: refused below with our budget
            with Image.open(io.BytesIO(buf), formats=[_PIL_FORMAT[encoding]]) as im:
                w, h = im.size  # as stored: decode_image ignores an EXIF orientation too
    except Image.DecompressionBombError:
        raise WireError("too_large", f"the {encoding} header declares a huge image", stream_id) from None
    except Exception as e:  # Pillow raises many types on a broken header
        raise WireError("undecodable", f"{encoding} header unreadable: {str(e)[:80]}", stream_id) from None
    if not (1 <= w <= MAX_DIM and 1 <= h <= MAX_DIM) or w * h * 3 > max_frame_bytes:
        raise WireError("too_large", f"the {encoding} is {w}x{h}: over {MAX_DIM} a side or {max_frame_bytes} bytes "
                        "decoded (the raw frame budget)", stream_id)
    return w, h


def decode_image(m: FrameMessage) -> np.ndarray:
    """Payload -> ``(H, W, 3)`` uint8 RGB."""
    buf = _as_buffer(m.payload)
    if ENCODINGS[m.encoding] == 0:
        import cv2

        # as stored, like a raw frame: an EXIF orientation is not applied (the header's size, K and the
        # decompression-bomb check all refer to the stored image)
        arr = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if arr is None:
            raise WireError("undecodable", f"{m.encoding} payload of {len(buf)} bytes does not decode", m.stream_id)
        if (m.width and arr.shape[1] != m.width) or (m.height and arr.shape[0] != m.height):
            raise WireError("bad_size", f"decoded {arr.shape[1]}x{arr.shape[0]}, header says {m.width}x{m.height}",
                            m.stream_id)
        return np.ascontiguousarray(arr[..., ::-1])
    c = ENCODINGS[m.encoding]
    rows = np.frombuffer(buf, np.uint8).reshape(m.height, m.step)[:, : m.width * c]
    img = rows.reshape(m.height, m.width, c)
    if m.encoding == "rgb8":
        return img.copy()
    if m.encoding == "bgr8":
        return np.ascontiguousarray(img[..., ::-1])
    return np.repeat(img, 3, axis=2)


def encode_frame(image: np.ndarray, stream_id: str, seq: int, *, encoding: str = "rgb8", stamp_ns: Optional[int] = None,
                 K: Optional[np.ndarray] = None, reset: bool = False, ack: bool = False, lossless: Optional[bool] = None,
                 session: Optional[str] = None, quality: int = 90) -> list:
    """``(H, W, 3)`` uint8 RGB (or ``(H, W)`` for ``mono8``) -> ``[header_json, payload]``."""
    if not valid_stream_id(stream_id):
        raise ValueError(f"invalid stream_id {stream_id!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}")
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "stream_id": stream_id, "seq": int(seq),
                              "stamp_ns": int(stamp_ns if stamp_ns is not None else _now_ns()), "encoding": encoding,
                              "width": int(w), "height": int(h)}
    if encoding == "mono8":
        if img.ndim != 2:
            raise ValueError("mono8 needs an (H, W) image")
        payload = np.ascontiguousarray(img)
    else:
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{encoding} needs an (H, W, 3) RGB image")
        if encoding == "rgb8":
            payload = np.ascontiguousarray(img)
        elif encoding == "bgr8":
            payload = np.ascontiguousarray(img[..., ::-1])
        else:
            import cv2

            ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, quality]) if encoding == "jpeg" else (".png", [])
            ok, buf = cv2.imencode(ext, np.ascontiguousarray(img[..., ::-1]), params)
            if not ok:
                raise ValueError(f"could not encode {encoding}")
            payload = buf.tobytes()
    if ENCODINGS[encoding]:
        header["step"] = int(w * ENCODINGS[encoding])
    if K is not None:
        header["K"] = np.asarray(K, dtype=float).reshape(3, 3).tolist()
    for name, value in (("reset", reset), ("ack", ack)):
        if value:
            header[name] = True
    if lossless is not None:
        header["lossless"] = bool(lossless)
    if session is not None:
        header["session"] = session
    return [json.dumps(header, separators=(",", ":")).encode(), payload]


# ---------------------------------------------------------------------------------------------
# arrays in JSON-described binary parts (results and control replies)

def pack_arrays(header: dict, arrays: dict[str, np.ndarray]) -> list:
    """``header`` gains ``arrays: [{name, dtype, shape}]``; the array buffers follow in that order."""
    specs, parts = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        specs.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape)})
        parts.append(a)
    return [json.dumps({**header, "arrays": specs}, separators=(",", ":")).encode(), *parts]


def unpack_arrays(parts: Sequence[Any]) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of :func:`pack_arrays` (validates count, dtypes and sizes)."""
    if not parts:
        raise WireError("bad_parts", "empty message")
    try:
        header = json.loads(bytes(_as_buffer(parts[0])).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError("bad_json", str(e)[:80]) from None
    if not isinstance(header, dict):
        raise WireError("bad_json", "header must be a JSON object")
    specs = header.get("arrays", [])
    if not isinstance(specs, list) or len(specs) != len(parts) - 1:
        raise WireError("bad_parts", f"{len(parts) - 1} binary parts for {len(specs) if isinstance(specs, list) else '?'} arrays")
    arrays = {}
    for spec, part in zip(specs, parts[1:]):
        try:
            dtype, shape = np.dtype(spec["dtype"]), tuple(int(d) for d in spec["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise WireError("bad_field", f"array spec {spec}: {e}") from None
        if dtype.hasobject:
            raise WireError("bad_field", "object arrays are not allowed")
        buf = _as_buffer(part)
        if len(buf) != dtype.itemsize * int(np.prod(shape)):
            raise WireError("bad_size", f"array {spec.get('name')}: {len(buf)} bytes for {shape} {dtype}")
        arrays[str(spec["name"])] = np.frombuffer(buf, dtype).reshape(shape)
    return header, arrays


def encode_result(stream_id: str, kind: str, header: dict, arrays: Optional[dict[str, np.ndarray]] = None) -> list:
    """A results message ``[b"<stream_id>/<kind>", header_json, *arrays]`` (kind: pose, geometry, status)."""
    body = pack_arrays({"v": PROTOCOL_VERSION, "stream_id": stream_id, "kind": kind, **header}, arrays or {})
    return [f"{stream_id}/{kind}".encode(), *body]


def decode_result(parts: Sequence[Any]) -> tuple[str, dict, dict[str, np.ndarray]]:
    """``(topic, header, arrays)`` of a results message."""
    if len(parts) < 2:
        raise WireError("bad_parts", "a result has a topic and a header at least")
    header, arrays = unpack_arrays(parts[1:])
    return bytes(_as_buffer(parts[0])).decode(), header, arrays


def encode_request(cmd: str, **fields: Any) -> list:
    return [json.dumps({"cmd": cmd, **fields}, separators=(",", ":")).encode()]


def decode_request(parts: Sequence[Any]) -> dict:
    """A control request: one JSON object with a string ``cmd``."""
    if len(parts) != 1:
        raise WireError("bad_parts", f"a request is one JSON part, got {len(parts)}")
    if _bytes_len(parts[0]) > MAX_HEADER_BYTES:
        raise WireError("too_large", "request too large")
    try:
        req = json.loads(bytes(_as_buffer(parts[0])).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WireError("bad_json", f"request is not JSON: {str(e)[:80]}") from None
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise WireError("missing_field", "request must be an object with a string 'cmd'")
    return req


def encode_reply(ok: bool, arrays: Optional[dict[str, np.ndarray]] = None, **fields: Any) -> list:
    return pack_arrays({"ok": ok, **fields}, arrays or {})


def decode_reply(parts: Sequence[Any]) -> tuple[dict, dict[str, np.ndarray]]:
    return unpack_arrays(parts)
