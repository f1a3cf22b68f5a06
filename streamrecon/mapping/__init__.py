"""The global map (voxel downsampling, colour averaging, point budget) and its exports."""

from .export import TUM_HEADER, read_ply, read_tum, tum_lines, write_glb, write_ply, write_tum
from .voxel_map import DEFAULT_CONF_THRESH, GlobalMap, IntegrateResult, MapConfig

__all__ = ["DEFAULT_CONF_THRESH", "GlobalMap", "IntegrateResult", "MapConfig", "read_ply",
           "read_tum", "tum_lines", "TUM_HEADER", "write_glb", "write_ply", "write_tum"]
