"""Model configuration: a frozen dataclass, the named presets, and the reference model-string parser.

The official CUT3R checkpoints store their architecture as a Python expression
(``ARCroco3DStereo(ARCroco3DStereoConfig(...))``). We never execute it: :func:`parse_model_string`
reads it with :mod:`ast` as plain data and maps the keyword arguments onto :class:`ModelConfig`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "ModelConfig",
    "PRESETS",
    "ConfigError",
    "preset",
    "parse_model_string",
    "config_from_model_kwargs",
    "config_from_checkpoint_args",
]

# DPT widths the reference hard-codes (facts §1.2); golden sets may override them via args.dpt_*.
DPT_FEATURE_DIM = 256
DPT_LAST_DIM = 128
DPT_LAYER_DIMS = (96, 192, 384, 768)


class ConfigError(ValueError):
    """A model description that cannot be turned into a :class:`ModelConfig`."""


# Sane bounds for a config (a model string or sidecar is untrusted input: ``enc_depth=5000`` or a
# 10**6-wide layer would make building the model take unbounded time and memory). The official
# models use depths <= 24, widths <= 1024, 16-pixel patches and 512-pixel images.
MAX_DEPTH = 64
MAX_WIDTH = 4096
MAX_HEADS = 256
MAX_TOKENS = 8192  # state_size, local_mem_size
MAX_PATCH_SIZE = 64
MAX_IMG_SIZE = 4096
MAX_MLP_RATIO = 16.0
_INT_FIELDS = {  # name -> (lowest, highest)
    "enc_embed_dim": (1, MAX_WIDTH), "enc_depth": (1, MAX_DEPTH), "enc_num_heads": (1, MAX_HEADS),
    "dec_embed_dim": (1, MAX_WIDTH), "dec_depth": (1, MAX_DEPTH), "dec_num_heads": (1, MAX_HEADS),
    "state_dec_num_heads": (1, MAX_HEADS), "state_size": (1, MAX_TOKENS), "local_mem_size": (1, MAX_TOKENS),
    "ray_enc_depth": (1, MAX_DEPTH), "ray_enc_num_heads": (1, MAX_HEADS), "patch_size": (1, MAX_PATCH_SIZE),
    "dpt_feature_dim": (1, MAX_WIDTH), "dpt_last_dim": (1, MAX_WIDTH),
}


def _is_int(v: Any) -> bool:
    """A whole number of any integer type (numpy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _as_int_tuple(name: str, value: Any) -> tuple:
    """``value`` (a sequence of whole numbers) as a tuple of ints; :class:`ConfigError` otherwise."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or hasattr(value, "keys"):
        raise ConfigError(f"invalid model config: {name} must be a list of integers, got {value!r:.80}")
    items = list(value)
    if len(items) > 16:
        raise ConfigError(f"invalid model config: {name} has {len(items)} entries")
    if not all(_is_int(d) or (isinstance(d, float) and d.is_integer()) for d in items):
        raise ConfigError(f"invalid model config: {name} must be a list of integers, got {value!r:.80}")
    return tuple(int(d) for d in items)


def _type_problems(cfg: "ModelConfig") -> list[str]:
    """Fields of the wrong type (a string where an int belongs...), before any arithmetic on them."""
    problems = []
    for name in _INT_FIELDS:
        if not _is_int(getattr(cfg, name)):
            problems.append(f"{name} must be an integer, got {getattr(cfg, name)!r:.60}")
    for name in ("mlp_ratio", "rope_freq"):
        if not _is_real(getattr(cfg, name)):
            problems.append(f"{name} must be a number, got {getattr(cfg, name)!r:.60}")
    if not isinstance(cfg.rgb_head, bool):
        problems.append(f"rgb_head must be true or false, got {cfg.rgb_head!r:.60}")
    for name in ("head_type", "state_pe"):
        if not isinstance(getattr(cfg, name), str):
            problems.append(f"{name} must be a string, got {getattr(cfg, name)!r:.60}")
    for name in ("depth_mode", "conf_mode", "pose_mode"):
        mode = getattr(cfg, name)
        if len(mode) != 3 or not isinstance(mode[0], str) or not all(_is_real(v) for v in mode[1:]):
            problems.append(f"{name} must be (name, vmin, vmax), got {mode!r:.80}")
    return problems


def _range_problems(cfg: "ModelConfig") -> list[str]:
    """Fields outside the sane bounds (``MAX_*``), each named."""
    problems = []
    for name, (low, high) in _INT_FIELDS.items():
        v = getattr(cfg, name)
        if not low <= v <= high:
            problems.append(f"{name} must be in [{low}, {high}], got {v}")
    for name, v in (("dpt_layer_dims", cfg.dpt_layer_dims), ("img_size", cfg.img_size)):
        high = MAX_WIDTH if name == "dpt_layer_dims" else MAX_IMG_SIZE
        if not all(1 <= d <= high for d in v):
            problems.append(f"{name} entries must be in [1, {high}], got {v}")
    if len(cfg.img_size) != 2:
        problems.append(f"img_size must be (height, width), got {cfg.img_size}")
    if not (math.isfinite(cfg.mlp_ratio) and 0 < cfg.mlp_ratio <= MAX_MLP_RATIO):
        problems.append(f"mlp_ratio must be in (0, {MAX_MLP_RATIO:g}], got {cfg.mlp_ratio}")
    if not (math.isfinite(cfg.rope_freq) and cfg.rope_freq > 0):
        problems.append(f"rope_freq must be a finite number > 0, got {cfg.rope_freq}")
    for name in ("depth_mode", "conf_mode", "pose_mode"):
        if any(math.isnan(v) for v in getattr(cfg, name)[1:]):
            problems.append(f"{name} bounds must not be NaN")
    return problems


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a CUT3R model. Field names follow the reference ``ARCroco3DStereoConfig``.

    Args:
        enc_embed_dim: width of the image/raymap encoder tokens (``ed``).
        enc_depth: number of image-encoder blocks.
        enc_num_heads: heads of the image-encoder blocks.
        dec_embed_dim: width of the decoder, state and head tokens (``dd``).
        dec_depth: number of blocks in each of the two decoder branches (``D``).
        dec_num_heads: heads of the image-branch decoder, LocalMemory and head modulation blocks.
        state_dec_num_heads: heads of the state-branch decoder.
        state_size: number of state tokens ``S``.
        local_mem_size: number of LocalMemory slots ``M``.
        state_pe: positions of the state tokens for RoPE: ``"2d"``, ``"1d"`` or ``"none"``.
        ray_enc_depth: number of raymap-encoder blocks.
        ray_enc_num_heads: heads of the raymap encoder (hard-coded 16 in the reference).
        mlp_ratio: hidden/width ratio of the encoder and decoder MLPs.
        patch_size: patch size in pixels (input H and W must be multiples of it).
        head_type: ``"dpt"`` or ``"linear"``.
        rgb_head: whether the model predicts colours.
        depth_mode: pointmap activation ``(name, vmin, vmax)``.
        conf_mode: confidence activation ``(name, vmin, vmax)``.
        pose_mode: translation activation ``(name, vmin, vmax)``.
        rope_freq: RoPE base (``pos_embed='RoPE100'`` -> 100).
        dpt_feature_dim: DPT fusion width (reference: 256).
        dpt_last_dim: DPT last hidden width (reference: 128).
        dpt_layer_dims: DPT per-level widths (reference: 96, 192, 384, 768).
        img_size: training resolution, stored only (RoPE works at any multiple of ``patch_size``).
    """

    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    state_dec_num_heads: int = 16
    state_size: int = 768
    local_mem_size: int = 256
    state_pe: str = "2d"
    ray_enc_depth: int = 2
    ray_enc_num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    head_type: str = "dpt"
    rgb_head: bool = True
    depth_mode: tuple = ("exp", -math.inf, math.inf)
    conf_mode: tuple = ("exp", 1.0, math.inf)
    pose_mode: tuple = ("exp", -math.inf, math.inf)
    rope_freq: float = 100.0
    dpt_feature_dim: int = DPT_FEATURE_DIM
    dpt_last_dim: int = DPT_LAST_DIM
    dpt_layer_dims: tuple = DPT_LAYER_DIMS
    img_size: tuple = (512, 512)

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:  # numpy integers (a checkpoint's args may hold them) become ints
            v = getattr(self, name)
            if _is_int(v) and type(v) is not int:
                object.__setattr__(self, name, int(v))
        for name in ("mlp_ratio", "rope_freq"):
            v = getattr(self, name)
            if _is_real(v) and type(v) not in (int, float):
                object.__setattr__(self, name, float(v))
        kind = type(self.rgb_head)
        if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):  # numpy's bool
            object.__setattr__(self, "rgb_head", bool(self.rgb_head))
        for name in ("depth_mode", "conf_mode", "pose_mode"):
            mode = getattr(self, name)
            if not isinstance(mode, (tuple, list)):
                raise ConfigError(f"invalid model config: {name} must be (name, vmin, vmax), got {mode!r:.80}")
            object.__setattr__(self, name, tuple(float(v) if _is_real(v) and type(v) not in (int, float) else v
                                                 for v in mode))
        object.__setattr__(self, "dpt_layer_dims", _as_int_tuple("dpt_layer_dims", self.dpt_layer_dims))
        object.__setattr__(self, "img_size", _as_int_tuple("img_size", self.img_size))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for combinations the model cannot build, fields of the wrong
        type, or sizes beyond the sane bounds (``MAX_DEPTH``, ``MAX_WIDTH``...), naming each field."""
        problems = _type_problems(self)
        problems = problems or _range_problems(self)
        if problems:  # the checks below do arithmetic on the fields
            raise ConfigError("invalid model config: " + "; ".join(problems))
        if self.head_type not in ("dpt", "linear"):
            problems.append(f"head_type must be 'dpt' or 'linear', got {self.head_type!r}")
        if self.state_pe not in ("2d", "1d", "none"):
            problems.append(f"state_pe must be '2d', '1d' or 'none', got {self.state_pe!r}")
        for name, dim, heads in (
            ("enc", self.enc_embed_dim, self.enc_num_heads),
            ("dec", self.dec_embed_dim, self.dec_num_heads),
            ("state_dec", self.dec_embed_dim, self.state_dec_num_heads),
            ("ray_enc", self.enc_embed_dim, self.ray_enc_num_heads),
        ):
            if dim % heads:
                problems.append(f"{name}: width {dim} is not divisible by {heads} heads")
            elif (dim // heads) % 4:
                problems.append(f"{name}: head dim {dim // heads} must be divisible by 4 for 2D RoPE")
        if (2 * self.dec_embed_dim) % self.dec_num_heads:
            problems.append("LocalMemory width 2*dec_embed_dim must be divisible by dec_num_heads")
        if self.dec_depth < 2:
            problems.append(f"dec_depth must be >= 2 (heads read decoder layers D/2 and 3D/4), got {self.dec_depth}")
        if len(self.dpt_layer_dims) != 4:
            problems.append(f"dpt_layer_dims needs 4 entries, got {self.dpt_layer_dims}")
        if self.dpt_feature_dim % 2:
            problems.append("dpt_feature_dim must be even")
        for name, mode in (("depth_mode", self.depth_mode), ("conf_mode", self.conf_mode), ("pose_mode", self.pose_mode)):
            if len(mode) != 3:
                problems.append(f"{name} must be (name, vmin, vmax), got {mode}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (infinities written as strings ``"inf"``/``"-inf"``)."""
        out = {}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a model config must be a mapping of fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown model config fields: {unknown}")
        return cls(**{k: _unjson(v) for k, v in data.items()})

    def to_model_string(self) -> str:
        """The reference ``ARCroco3DStereo(ARCroco3DStereoConfig(...))`` string for this config.

        The DPT widths are not part of it (the reference hard-codes them); checkpoints store
        non-default widths as ``args.dpt_*`` next to the string.
        """
        def lit(v: Any) -> str:
            if isinstance(v, float) and math.isinf(v):
                return "inf" if v > 0 else "-inf"
            if isinstance(v, tuple):
                return "(" + ", ".join(lit(x) for x in v) + ("," if len(v) == 1 else "") + ")"
            return repr(v)

        fields = {
            "state_size": self.state_size, "state_pe": self.state_pe, "pos_embed": f"RoPE{self.rope_freq:g}",
            "rgb_head": self.rgb_head, "pose_head": True, "img_size": self.img_size, "head_type": self.head_type,
            "output_mode": "pts3d+pose", "depth_mode": self.depth_mode, "conf_mode": self.conf_mode,
            "pose_mode": self.pose_mode, "enc_embed_dim": self.enc_embed_dim, "enc_depth": self.enc_depth,
            "enc_num_heads": self.enc_num_heads, "dec_embed_dim": self.dec_embed_dim, "dec_depth": self.dec_depth,
            "dec_num_heads": self.dec_num_heads, "state_dec_num_heads": self.state_dec_num_heads,
            "local_mem_size": self.local_mem_size, "ray_enc_depth": self.ray_enc_depth, "mlp_ratio": self.mlp_ratio,
            "patch_size": self.patch_size,
        }
        if self.ray_enc_num_heads != 16:
            raise ConfigError("the reference hard-codes 16 raymap-encoder heads; this config cannot be written")
        args = ", ".join(f"{k}={lit(v)}" for k, v in fields.items())
        return f"ARCroco3DStereo(ARCroco3DStereoConfig({args}))"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a config from a ``.json`` or ``.yaml``/``.yml`` file (plain data, safe loaders only)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if isinstance(data, dict) and "config" in data and isinstance(data["config"], dict):
            data = data["config"]  # our .safetensors sidecar
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config fields")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    return v


def _unjson(v: Any) -> Any:
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    if isinstance(v, list):
        return tuple(_unjson(x) for x in v)
    return v


PRESETS: dict[str, ModelConfig] = {
    # config/dpt_512_vary_4_64.yaml -> cut3r_512_dpt_4_64.pth
    "cut3r_512_dpt": ModelConfig(head_type="dpt", img_size=(512, 512)),
    # config/linear_224_fixed_16.yaml -> cut3r_224_linear_4.pth
    "cut3r_224_linear": ModelConfig(head_type="linear", img_size=(224, 224)),
    # ours: the same architecture, sized for interactive CPU inference at 160 x 112 (the bundled model)
    "streamrecon_small": ModelConfig(
        enc_embed_dim=192, enc_depth=6, enc_num_heads=3, dec_embed_dim=96, dec_depth=4, dec_num_heads=3,
        state_dec_num_heads=3, state_size=64, local_mem_size=64, head_type="linear", img_size=(112, 160),
    ),
}


def preset(name: str) -> ModelConfig:
    """Return a named preset (``cut3r_512_dpt``, ``cut3r_224_linear``, ...)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# Reference model string -> ModelConfig (data only, never eval)

# Keyword arguments of ARCroco3DStereoConfig / CrocoConfig that only matter for training or that
# the loader overrides; accepted and ignored.
_IGNORED_FIELDS = {"freeze", "landscape_only", "patch_embed_cls", "mask_ratio", "pos_embed_dropout",
                   "depth_head", "pose_conf_head", "model_update_type"}
_DIRECT_FIELDS = {
    "enc_embed_dim", "enc_depth", "enc_num_heads", "dec_embed_dim", "dec_depth", "dec_num_heads",
    "state_dec_num_heads", "state_size", "local_mem_size", "state_pe", "ray_enc_depth", "mlp_ratio",
    "patch_size", "head_type", "rgb_head", "depth_mode", "conf_mode", "pose_mode", "img_size",
}
_NAMED_CONSTANTS = {"inf": math.inf, "nan": math.nan, "True": True, "False": False, "None": None}


def _literal(node: ast.AST) -> Any:
    """Evaluate a literal expression node: numbers, strings, tuples/lists/dicts, ``inf``, unary +/-."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"unary sign on a non-number: {ast.dump(node)}")
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.Tuple, ast.List)):
        vals = [_literal(e) for e in node.elts]
        return tuple(vals) if isinstance(node, ast.Tuple) else vals
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    raise ConfigError(f"model string contains a non-literal expression: {ast.unparse(node)!r}")


def parse_model_string(text: str) -> dict[str, Any]:
    """Read ``ARCroco3DStereo(ARCroco3DStereoConfig(k=v, ...))`` as data and return the keywords.

    Spacing, line breaks and argument order do not matter. Only literals are accepted (numbers,
    strings, tuples, ``inf``); anything else raises :class:`ConfigError`.
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ConfigError(f"model string is not a valid expression: {e}") from None
    call = tree.body
    # Unwrap the outer model call: ARCroco3DStereo(<config call>)
    if isinstance(call, ast.Call) and _call_name(call) == "ARCroco3DStereo":
        if len(call.args) != 1 or call.keywords:
            raise ConfigError("ARCroco3DStereo(...) must take exactly one config argument")
        call = call.args[0]
    if not (isinstance(call, ast.Call) and _call_name(call) in ("ARCroco3DStereoConfig", "CrocoConfig")):
        raise ConfigError(f"expected ARCroco3DStereoConfig(...) in the model string, got {text[:80]!r}")
    if call.args:
        raise ConfigError("ARCroco3DStereoConfig takes keyword arguments only")
    kwargs = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ConfigError("**kwargs are not allowed in the model string")
        kwargs[kw.arg] = _literal(kw.value)
    return kwargs


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute):
        return f.attr
    return None


def config_from_model_kwargs(kwargs: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> ModelConfig:
    """Map reference config keywords (plus optional ``dpt_*`` overrides) onto :class:`ModelConfig`."""
    kw = dict(kwargs)
    out: dict[str, Any] = {}
    output_mode = kw.pop("output_mode", "pts3d")
    if output_mode != "pts3d+pose":
        raise ConfigError(f"only output_mode='pts3d+pose' is supported (streaming needs the pose head), got {output_mode!r}")
    if not kw.pop("pose_head", False):
        raise ConfigError("pose_head=False models cannot stream (the reference assumes the pose head)")
    pos_embed = kw.pop("pos_embed", "cosine")
    if not (isinstance(pos_embed, str) and pos_embed.startswith("RoPE")):
        raise ConfigError(f"only RoPE position embeddings are supported, got pos_embed={pos_embed!r}")
    out["rope_freq"] = float(pos_embed[len("RoPE"):] or 100)
    if "norm_im2_in_dec" in kw and not kw.pop("norm_im2_in_dec"):
        raise ConfigError("norm_im2_in_dec=False is not supported")
    reference_defaults = {"enc_embed_dim": 768, "enc_depth": 12, "enc_num_heads": 12, "dec_embed_dim": 512,
                          "dec_depth": 8, "dec_num_heads": 16, "state_size": 324, "head_type": "linear",
                          "rgb_head": False, "img_size": 224}
    for k, v in reference_defaults.items():
        kw.setdefault(k, v)
    for k, v in kw.items():
        if k in _IGNORED_FIELDS:
            continue
        if k not in _DIRECT_FIELDS:
            raise ConfigError(f"unsupported model config field {k}={v!r}")
        out[k] = v
    if isinstance(out.get("img_size"), int):
        out["img_size"] = (out["img_size"], out["img_size"])
    for k in ("dpt_feature_dim", "dpt_last_dim", "dpt_layer_dims"):
        if extra and extra.get(k) is not None:
            out[k] = extra[k]
    return ModelConfig(**out)


def config_from_checkpoint_args(args: Mapping[str, Any]) -> ModelConfig:
    """Build the config from a checkpoint's plain ``args`` mapping (``model`` string + ``dpt_*``)."""
    model = args.get("model")
    if not isinstance(model, str):
        raise ConfigError("checkpoint args carry no 'model' string")
    return config_from_model_kwargs(parse_model_string(model), extra=args)
