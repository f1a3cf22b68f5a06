"""The global map (voxel downsampling, colour averaging, point budget) and its exports."""

from .export import read_ply, read_tum, write_glb, write_ply, write_tum
from .voxel_map import DEFAULT_CONF_THRESH, GlobalMap, IntegrateResult, MapConfig, model_conf_thresh

__all__ = ["DEFAULT_CONF_THRESH", "GlobalMap", "IntegrateResult", "MapConfig", "model_conf_thresh", "read_ply",
           "read_tum", "write_glb", "write_ply", "write_tum"]
