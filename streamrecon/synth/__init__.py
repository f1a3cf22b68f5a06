"""Synthetic ground truth: procedural rooms, camera trajectories, analytic rendering, datasets."""

from .render import render
from .scene import Scene, random_scene
from .trajectory import KINDS, intrinsics, make_trajectory

__all__ = ["render", "Scene", "random_scene", "KINDS", "intrinsics", "make_trajectory"]
