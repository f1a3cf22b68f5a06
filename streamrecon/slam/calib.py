"""Known camera intrinsics: ``--intrinsics fx,fy,cx,cy[,k1,k2,p1,p2[,k3]]`` and ``--calib FILE``.

Calibration files understood (YAML):

* OpenCV ``FileStorage`` (``cv2.FileStorage`` writes it; the ``%YAML:1.0`` header is accepted):
  ``camera_matrix`` (``rows/cols/data`` or a 3x3 list), ``distortion_coefficients``, ``image_width``,
  ``image_height``;
* ROS ``camera_info`` YAML (``camera_calibration``'s output): ``camera_matrix.data`` or ``K`` / ``k``
  (9 numbers), ``distortion_coefficients.data`` or ``D`` / ``d``, ``image_width``/``width``,
  ``image_height``/``height``, ``distortion_model`` (``plumb_bob`` / ``rational_polynomial``);
* Kalibr camchain YAML: ``cam0: {intrinsics: [fu, fv, pu, pv], distortion_coeffs: [...],
  distortion_model: radtan, resolution: [W, H]}`` (the first camera is used).

Distortion is OpenCV's ``k1, k2, p1, p2[, k3, ...]`` (radial-tangential). With distortion, frames are
undistorted once, before anything else sees them (:class:`Undistorter`); the undistorted frames have
the same ``K`` and no distortion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..settings import SettingsError

__all__ = ["Calibration", "parse_intrinsics", "read_calibration", "Undistorter"]


@dataclass(frozen=True)
class Calibration:
    """Attributes:
        K: ``(3, 3)`` intrinsics in original-image pixels.
        dist: OpenCV distortion coefficients (``k1, k2, p1, p2[, k3]``), empty when none.
        size: ``(W, H)`` the calibration was made for, if known.
        source: where it came from (for messages).
    """

    K: np.ndarray
    dist: np.ndarray
    size: Optional[tuple[int, int]] = None
    source: str = "--intrinsics"

    @property
    def distorted(self) -> bool:
        return bool(len(self.dist)) and bool(np.any(self.dist != 0))

    def validate(self) -> None:
        """Raise :class:`SettingsError` naming the field that cannot be right."""
        K = self.K
        if K.shape != (3, 3) or not np.isfinite(K).all():
            raise SettingsError(f"{self.source}: K must be a finite 3x3 matrix")
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise SettingsError(f"{self.source}: focal lengths fx={K[0, 0]:g}, fy={K[1, 1]:g} must be positive")
        if not np.isfinite(self.dist).all():
            raise SettingsError(f"{self.source}: distortion coefficients must be finite")
        if len(self.dist) not in (0, 4, 5, 8, 12, 14):
            raise SettingsError(f"{self.source}: {len(self.dist)} distortion coefficients; expected 4, 5, 8, 12 or 14")
        if self.size is not None:
            w, h = self.size
            if w <= 0 or h <= 0:
                raise SettingsError(f"{self.source}: image size {w}x{h} must be positive")
            if not (0 < K[0, 2] < w and 0 < K[1, 2] < h):
                raise SettingsError(f"{self.source}: principal point ({K[0, 2]:g}, {K[1, 2]:g}) is outside the "
                                    f"{w}x{h} image")

    def check_image(self, width: int, height: int) -> None:
        """Raise :class:`SettingsError` when a frame of ``width x height`` cannot be this camera's."""
        if self.size is not None and tuple(self.size) != (width, height):
            raise SettingsError(f"{self.source}: calibrated for {self.size[0]}x{self.size[1]} images, but the frames "
                                f"are {width}x{height}")
        K = self.K
        if not (0 < K[0, 2] < width and 0 < K[1, 2] < height):
            raise SettingsError(f"{self.source}: principal point ({K[0, 2]:g}, {K[1, 2]:g}) is outside the "
                                f"{width}x{height} frames")


def _K(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def parse_intrinsics(text: str) -> Calibration:
    """``"fx,fy,cx,cy[,k1,k2,p1,p2[,k3]]"`` (commas or spaces) -> :class:`Calibration`."""
    try:
        v = [float(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        raise SettingsError(f"--intrinsics {text!r}: expected numbers fx,fy,cx,cy[,k1,k2,p1,p2[,k3]]") from None
    if len(v) not in (4, 8, 9):
        raise SettingsError(f"--intrinsics {text!r}: expected 4 (fx,fy,cx,cy), 8 or 9 numbers (with k1,k2,p1,p2[,k3]), "
                            f"got {len(v)}")
    cal = Calibration(_K(*v[:4]), np.asarray(v[4:], dtype=np.float64))
    cal.validate()
    return cal


def _numbers(value: Any, name: str, source: str) -> np.ndarray:
    if isinstance(value, dict):
        value = value.get("data")
    try:
        a = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise SettingsError(f"{source}: {name} must be numbers") from None
    return a


def _load_yaml(path: Path) -> dict:
    import yaml

    text = path.read_text()
    text = re.sub(r"^%YAML[: ]?1\.\d\s*\n", "", text)  # OpenCV's header
    text = text.replace("!!opencv-matrix", "")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping (OpenCV, ROS camera_info or Kalibr YAML)")
    return data


def read_calibration(path: str | Path) -> Calibration:
    """Read an OpenCV / ROS ``camera_info`` / Kalibr YAML calibration file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"--calib {path}: file not found")
    d = _load_yaml(path)
    src = f"--calib {path}"
    if "camera_matrix" not in d and "K" not in d and "k" not in d:  # Kalibr camchain: the first camera
        cams = [k for k in sorted(d) if isinstance(d[k], dict) and "intrinsics" in d[k]]
        if not cams:
            raise SettingsError(f"{src}: no camera_matrix / K (OpenCV, ROS) or camN.intrinsics (Kalibr) found")
        c = d[cams[0]]
        fu = _numbers(c["intrinsics"], "intrinsics", src)
        if len(fu) != 4:
            raise SettingsError(f"{src}: {cams[0]}.intrinsics must be [fu, fv, pu, pv]")
        model = str(c.get("distortion_model", "radtan"))
        if model not in ("radtan", "none"):
            raise SettingsError(f"{src}: distortion_model {model!r} is not supported (radtan only)")
        dist = _numbers(c.get("distortion_coeffs", []), "distortion_coeffs", src)
        res = c.get("resolution")
        size = (int(res[0]), int(res[1])) if res else None
        cal = Calibration(_K(*fu), dist, size, src)
    else:
        Kv = _numbers(d.get("camera_matrix", d.get("K", d.get("k"))), "camera_matrix", src)
        if len(Kv) != 9:
            raise SettingsError(f"{src}: camera_matrix must have 9 numbers, got {len(Kv)}")
        dist = _numbers(d.get("distortion_coefficients", d.get("D", d.get("d", []))), "distortion_coefficients", src)
        model = str(d.get("distortion_model", "plumb_bob"))
        if model not in ("plumb_bob", "rational_polynomial", "radtan"):
            raise SettingsError(f"{src}: distortion_model {model!r} is not supported")
        w = d.get("image_width", d.get("width"))
        h = d.get("image_height", d.get("height"))
        try:
            size = (int(w), int(h)) if w is not None and h is not None else None
        except (TypeError, ValueError):
            raise SettingsError(f"{src}: image_width / image_height must be integers") from None
        cal = Calibration(Kv.reshape(3, 3), dist, size, src)
    cal.validate()
    return cal


class Undistorter:
    """Undistorts frames of one calibration (maps built once per image size; ``K`` is kept)."""

    def __init__(self, cal: Calibration) -> None:
        self.cal = cal
        self._maps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        import cv2

        if not self.cal.distorted:
            return image
        h, w = image.shape[:2]
        if (w, h) not in self._maps:
            self._maps[(w, h)] = cv2.initUndistortRectifyMap(self.cal.K, self.cal.dist, None, self.cal.K, (w, h),
                                                             cv2.CV_16SC2)
        m1, m2 = self._maps[(w, h)]
        return cv2.remap(image, m1, m2, cv2.INTER_LINEAR)
