"""The torch-free wire codec: round trips, every kind of malformed message, imagezmq messages."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from streamrecon import wire
from streamrecon.wire import WireError, decode_frame, encode_frame

from .conftest import REPO

RNG = np.random.default_rng(0)
_yy, _xx = np.mgrid[0:24, 0:40]
IMG = np.stack([_xx * 6, _yy * 10, 128 + _xx - _yy], -1).astype(np.uint8)  # smooth: JPEG keeps it close


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "png", "jpeg"])
def test_round_trip(encoding):
    K = np.array([[50.0, 0, 20], [0, 50, 12], [0, 0, 1]])
    parts = encode_frame(IMG, "cam-1", 7, encoding=encoding, stamp_ns=123, K=K, reset=True, ack=True, session="s1")
    m = decode_frame(parts)
    assert (m.stream_id, m.seq, m.stamp_ns, m.encoding, m.reset, m.ack, m.session) == ("cam-1", 7, 123, encoding, True,
                                                                                       True, "s1")
    assert np.array_equal(m.K, K)
    out = m.image()
    if encoding == "jpeg":
        assert out.shape == IMG.shape and np.abs(out.astype(int) - IMG).mean() < 3
    else:
        assert np.array_equal(out, IMG)


def test_mono_and_padded_rows():
    gray = IMG[..., 0].copy()
    assert np.array_equal(decode_frame(encode_frame(gray, "g", 0, encoding="mono8")).image(), np.repeat(gray[..., None], 3, 2))
    header = json.loads(encode_frame(IMG, "p", 0)[0])
    header["step"] = 40 * 3 + 8
    padded = np.zeros((24, 128), np.uint8)
    padded[:, :120] = IMG.reshape(24, 120)
    assert np.array_equal(decode_frame([json.dumps(header).encode(), padded.tobytes()]).image(), IMG)


def _h(**changes):
    h = json.loads(encode_frame(IMG, "cam", 1)[0])
    for k, v in changes.items():
        if v is ...:
            h.pop(k)
        else:
            h[k] = v
    return json.dumps(h).encode()


PAYLOAD = IMG.tobytes()
MALFORMED = [
    ([PAYLOAD], "bad_parts"),
    ([_h(), PAYLOAD, b"x"], "bad_parts"),
    ([b"{not json", PAYLOAD], "bad_json"),
    ([b"[1, 2]", PAYLOAD], "bad_json"),
    ([b"\xff\xfe", PAYLOAD], "bad_json"),
    ([_h(v=2), PAYLOAD], "bad_version"),
    ([_h(stream_id=...), PAYLOAD], "missing_field"),
    ([_h(seq=...), PAYLOAD], "missing_field"),
    ([_h(width=...), PAYLOAD], "missing_field"),
    ([_h(seq=-1), PAYLOAD], "bad_field"),
    ([_h(seq="3"), PAYLOAD], "bad_field"),
    ([_h(width=0), PAYLOAD], "bad_field"),
    ([_h(reset="yes"), PAYLOAD], "bad_field"),
    ([_h(K=[[1, 2], [3, 4]]), PAYLOAD], "bad_field"),
    ([_h(stream_id="../etc"), PAYLOAD], "bad_stream_id"),
    ([_h(stream_id=""), PAYLOAD], "bad_stream_id"),
    ([_h(encoding="yuv422"), PAYLOAD], "unknown_encoding"),
    ([_h(encoding=["rgb8"]), PAYLOAD], "unknown_encoding"),  # found by the node fuzz test
    ([_h(K={"a": 1}), PAYLOAD], "bad_field"),
    ([_h(session=["x"]), PAYLOAD], "bad_field"),
    ([_h(), PAYLOAD[:-5]], "truncated"),
    ([_h(), PAYLOAD + b"extra"], "bad_size"),
    ([_h(width=16384, height=16384, step=16384 * 3), PAYLOAD], "too_large"),
    ([b"{" + b" " * 70000 + b"}", PAYLOAD], "too_large"),
    ([_h(encoding="jpeg", width=..., height=..., step=...), b""], "truncated"),
    ([json.dumps({"msg": "cam", "dtype": "float32", "shape": [2, 2]}).encode(), b"0" * 16], "unknown_encoding"),
    ([json.dumps({"msg": "cam", "dtype": "uint8", "shape": [2, 2, 4]}).encode(), b"0" * 16], "unknown_encoding"),
    ([json.dumps({"msg": "cam", "dtype": "uint8", "shape": [3, 3, 3]}).encode(), b"0" * 5], "truncated"),
    ([json.dumps({"msg": "cam", "dtype": "uint8", "shape": "big"}).encode(), b"0"], "bad_field"),
    ([json.dumps({"msg": "/bad/"}).encode(), b"jpg"], "bad_stream_id"),
]


@pytest.mark.parametrize("parts,kind", MALFORMED)
def test_malformed_messages_name_their_problem(parts, kind):
    with pytest.raises(WireError) as e:
        decode_frame(parts, max_frame_bytes=1 << 20)
    assert e.value.kind == kind


def test_undecodable_compressed_payload_and_size_mismatch():
    with pytest.raises(WireError) as e:  # refused from its signature, before anything is decoded
        decode_frame([_h(encoding="jpeg", width=..., height=..., step=...), b"not a jpeg"])
    assert e.value.kind == "undecodable" and e.value.stream_id == "cam"
    jpeg = encode_frame(IMG, "cam", 0, encoding="jpeg")[1]
    cut = jpeg[: jpeg.find(b"\xff\xda") + 20]  # the header is whole, the image data is missing
    m = decode_frame([_h(encoding="jpeg", width=..., height=..., step=...), cut])
    with pytest.raises(WireError) as e:
        m.image()
    assert e.value.kind == "undecodable" and e.value.stream_id == "cam"
    parts = encode_frame(IMG, "cam", 0, encoding="png")
    h = json.loads(parts[0])
    h["width"] = 99
    with pytest.raises(WireError, match="bad_size"):
        decode_frame([json.dumps(h).encode(), parts[1]]).image()


def test_imagezmq_messages():
    bgr = np.ascontiguousarray(IMG[..., ::-1])
    m = decode_frame([json.dumps({"msg": "rpi kitchen|frame 3", "dtype": "uint8", "shape": [24, 40, 3]}).encode(),
                      bgr.tobytes()])
    assert m.stream_id == "rpi_kitchen" and m.origin == "imagezmq" and m.seq is None
    assert np.array_equal(m.image(), IMG)
    import cv2
    jpg = cv2.imencode(".png", bgr)[1].tobytes()  # send_jpg with PNG bytes: read by its signature
    jpg = cv2.imencode(".png", bgr)[1].tobytes()
    m = decode_frame([json.dumps({"msg": "cam2"}).encode(), jpg])
    assert m.encoding == "png" and np.array_equal(m.image(), IMG)


def test_results_and_control_messages_round_trip():
    pts = RNG.normal(size=(4, 5, 3)).astype(np.float16)
    topic, header, arrays = wire.decode_result(wire.encode_result("cam", "geometry", {"seq": 3}, {"points": pts}))
    assert topic == "cam/geometry" and header["seq"] == 3 and np.array_equal(arrays["points"], pts)
    reply, arrays = wire.decode_reply(wire.encode_reply(True, arrays={"rgb": IMG}, cmd="x"))
    assert reply["ok"] and np.array_equal(arrays["rgb"], IMG)
    body = wire.encode_reply(True, arrays={"rgb": IMG})
    with pytest.raises(WireError, match="bad_size"):
        wire.decode_reply([body[0], IMG.tobytes()[:-1]])
    spec = json.loads(body[0])
    spec["arrays"][0]["dtype"] = "O"
    with pytest.raises(WireError):
        wire.decode_reply([json.dumps(spec).encode(), IMG.tobytes()])
    assert wire.decode_request(wire.encode_request("ping", a=1)) == {"cmd": "ping", "a": 1}
    with pytest.raises(WireError):
        wire.decode_request([b'{"nocmd": 1}'])


def test_codec_and_bridges_import_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import streamrecon.wire, streamrecon.sources, streamrecon.mapping.export\n"
            "import streamrecon_bridges.camera_pub, streamrecon_bridges.results_sub\n"
            "import numpy as np\n"
            "from streamrecon.mapping import write_tum\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
