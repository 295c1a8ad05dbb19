"""`AdapterConfig`: which adapter kind, where it goes, and its hyperparameters.

Module selection follows PEFT's rules so configs translate one to one: `targets` as a sequence of
names matches a module whose path equals a name or ends with "." + name; as a string it is a regex that
must match the whole path. Paths are this project's module paths (`language_model.layers.0.self_attn.q_proj`).
`towers` restricts the search to path prefixes (the language model by default; add "vision_tower" or
"multi_modal_projector" to adapt those too). `rank_pattern` / `alpha_pattern` override rank / alpha for the
modules they match, with PEFT's rule (pattern matches the end of the path at a "." boundary; first wins).

What a target is depends on the kind: LoRA and SNELLA attach to projections (`Linear`), Serial LoRA to
attention blocks (modules with a `qkv_input_adapter` hook).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

KINDS = ("lora", "serial_lora", "snella")
# VaLoRA's published default: attention and MLP projections of the language model.
PROJECTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = {"lora": PROJECTION_TARGETS, "snella": PROJECTION_TARGETS, "serial_lora": ("self_attn",)}


@dataclasses.dataclass(frozen=True)
class SnellaConfig:
    """SNELLA's kernel, its training regularisers and the bi-level allocator, with the defaults of the
    authors' released code and FGVC / VTAB scripts (github ssfgunner/SNELL).

    `chunk_coefficients` are the c_p of the piecewise-linear kernel (one per rank chunk; (+0.1, -0.1) as
    in the released code). `dropout` drops adapter inputs and `drop_path` whole rows (samples) of the
    adapter's output, during training only (0.1 each, as their scripts train).

    Allocator: the kept fraction of all dW entries follows a cubic schedule from (1 - init_ratio) to
    (1 - target_ratio): constant for `warmup_steps`, cubic until `total_steps - final_steps`, then
    constant. Budgets are re-shared between matrices after every `mask_interval` steps past the warm-up
    (and every step once past `total_steps - final_steps`); never during the warm-up. `mask_interval=None`
    means total_steps // 100 (at least 1): the authors' scripts re-share once per epoch of 100 epochs,
    with no warm-up phases. `beta1` / `beta2` are the sensitivity / uncertainty EMA rates.
    """

    chunk_coefficients: tuple[float, ...] = (0.1, -0.1)
    init_ratio: float = 0.5
    target_ratio: float = 0.9
    total_steps: int = 1000
    warmup_steps: int = 0
    final_steps: int = 0
    mask_interval: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    dropout: float = 0.1
    drop_path: float = 0.1

    def __post_init__(self):
        if not 0.0 <= self.init_ratio <= self.target_ratio < 1.0:
            raise ValueError(f"need 0 <= init_ratio <= target_ratio < 1, got {self.init_ratio}, {self.target_ratio}")
        if self.warmup_steps + self.final_steps >= self.total_steps:
            raise ValueError("warmup_steps + final_steps must be less than total_steps")
        if self.mask_interval is not None and self.mask_interval < 1:
            raise ValueError(f"mask_interval must be >= 1 (or None), got {self.mask_interval}")
        for name in ("dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def interval(self) -> int:
        """Steps between two re-sharings of the budget (`mask_interval`, or its default)."""
        return self.mask_interval if self.mask_interval is not None else max(1, self.total_steps // 100)


def _as_pairs(pattern: Mapping[str, Any] | tuple) -> tuple[tuple[str, Any], ...]:
    return tuple(pattern.items()) if isinstance(pattern, Mapping) else tuple(tuple(p) for p in pattern)


def pattern_value(pattern: tuple[tuple[str, Any], ...], path: str, default):
    """PEFT's `get_pattern_key` rule: the first key matching the end of `path` at a '.' boundary."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """One adapter: `kind`, `rank`, `alpha` (LoRA scaling alpha / rank), input `dropout`, and where it goes.

    `targets=None` means the kind's default (`DEFAULT_TARGETS`). Patterns may be given as dicts; they are
    stored as tuples of pairs so the config is hashable (it is static model metadata under `jax.jit`).
    SNELLA ignores `alpha` and `dropout`: its mixed kernel carries its own learnable scale, and its dropout
    and drop-path rates are `SnellaConfig` settings.
    """

    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str | None = None
    towers: tuple[str, ...] = ("language_model",)
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    use_rslora: bool = False
    snella: SnellaConfig = SnellaConfig()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown adapter kind {self.kind!r}; supported: {KINDS}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        targets = DEFAULT_TARGETS[self.kind] if self.targets is None else self.targets
        object.__setattr__(self, "targets", targets if isinstance(targets, str) else tuple(targets))
        object.__setattr__(self, "towers", tuple(self.towers))
        object.__setattr__(self, "rank_pattern", _as_pairs(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", _as_pairs(self.alpha_pattern))
        if isinstance(self.snella, Mapping):
            object.__setattr__(self, "snella", SnellaConfig(**self.snella))
        if self.kind == "snella":
            for path_rank in [self.rank] + [r for _, r in self.rank_pattern]:
                if path_rank % len(self.snella.chunk_coefficients):
                    raise ValueError(f"SNELLA rank {path_rank} is not a multiple of the "
                                     f"{len(self.snella.chunk_coefficients)} kernel chunks")

    def selects(self, path: str) -> bool:
        """Whether the module at `path` gets an adapter."""
        if not any(path.startswith(tower + ".") for tower in self.towers):
            return False
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, path) is not None
        return any(path == t or path.endswith("." + t) for t in self.targets)

    def rank_for(self, path: str) -> int:
        return int(pattern_value(self.rank_pattern, path, self.rank))

    def scaling_for(self, path: str) -> float:
        """LoRA's output scale alpha / r (alpha / sqrt(r) with rsLoRA), with the module's own rank and alpha."""
        rank, alpha = self.rank_for(path), float(pattern_value(self.alpha_pattern, path, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rank_pattern"], out["alpha_pattern"] = dict(self.rank_pattern), dict(self.alpha_pattern)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AdapterConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown adapter config fields: {sorted(unknown)}")
        data = dict(data)
        if isinstance(data.get("targets"), list):
            data["targets"] = tuple(data["targets"])
        if "snella" in data:
            snella = dict(data["snella"])
            snella["chunk_coefficients"] = tuple(snella.get("chunk_coefficients", SnellaConfig.chunk_coefficients))
            data["snella"] = SnellaConfig(**snella)
        return cls(**data)
