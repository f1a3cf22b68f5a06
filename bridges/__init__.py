"""Torch-free clients of a ``streamrecon serve`` node, installed as ``streamrecon_bridges``.

``camera_pub`` (console script ``streamrecon-camera-pub``) and ``results_sub`` (``streamrecon-results-sub``).
"""
