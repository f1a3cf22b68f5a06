"""The global map (voxel downsampling, colour averaging, point budget) and its exports."""

from .export import read_ply, read_tum, write_glb, write_ply, write_tum
from .voxel_map import GlobalMap, IntegrateResult, MapConfig

__all__ = ["GlobalMap", "IntegrateResult", "MapConfig", "read_ply", "read_tum", "write_glb", "write_ply", "write_tum"]
