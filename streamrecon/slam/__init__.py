"""The geometric backend: known intrinsics (calibration, undistortion), feature tracking with PnP and
two-view geometry, keyframes, and the stage that puts them between the engine and the map."""

from .calib import Calibration, Undistorter, parse_intrinsics, read_calibration
from .stage import GeometryStage, calibration_from_settings
from .tracker import Tracker, TrackerConfig, TrackResult

__all__ = ["Calibration", "Undistorter", "parse_intrinsics", "read_calibration", "GeometryStage",
           "calibration_from_settings", "Tracker", "TrackerConfig", "TrackResult"]
