"""Cost model of one engine step, read from a profile file (JSON): the time of a prefill call, a
decode call and a weight switch, as the serving simulator charges them.

Prefill and decode are each a linear function of the step's features (`StepFeatures`):

    seconds = fixed_s + per_token_s * tokens + per_lora_token_s * lora_tokens
              + per_adapter_s * adapters + per_context_token_s * context_tokens + per_image_s * images
              + per_merged_s * merged

- tokens: positions computed (prefill: the admitted prompts, image tokens included; decode: one
  per running row).
- lora_tokens: positions times the LoRA terms each computes in the step's mode
  (`serve.batching.lora_terms`: 1 unmerged, 0 for the merged adapter's rows, 2 for other adapters'
  rows in mixture, 1 for base rows in mixture). This is where the mode enters.
- adapters: distinct adapters whose LoRA terms the step computes (in mixture, the merged adapter
  counts when any row carries its correction): the grouped kernels' per-adapter cost.
- context_tokens: KV positions the decode step attends over (prompt plus tokens generated so far,
  summed over rows); 0 for prefill.
- images: images encoded (prefill only).
- merged: 1 when an adapter is folded into the weights during the step (merged or mixture mode),
  else 0: what an engine's merged / mixture programs cost beyond its unmerged one whatever their rows
  (this project's engine computes the mixture correction on every slot of a mixture step; a
  merged-mode step, all of whose rows are the merged adapter's, runs the model alone).

Switches: `merge_s`, `unmerge_s` and `switch_s` (one merged adapter to another in one pass) per weight
change (`serve.batching.switch_ops`); a profile without `switch_s` charges such a switch an unmerge and a
merge.

A profile file:

    {"name": "...", "device": "...", "note": "...", "image_tokens": 576,
     "prefill": {"fixed_s": ..., "per_token_s": ..., ...},   # missing coefficients are 0
     "decode": {...},
     "switch": {"merge_s": ..., "unmerge_s": ..., "switch_s": ...}}

`LinearCost.fit` fits the coefficients to measured (features, seconds) samples by least squares;
`fit_profile` turns the engine's per-step `StepTiming` records into a profile (`python -m serve.profile`
measures one on the current device).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.optimize

from serve.batching import Mode, Request, lora_terms

PROFILES = pathlib.Path(__file__).resolve().parent.parent / "configs" / "profiles"


@dataclasses.dataclass(frozen=True)
class StepFeatures:
    tokens: int = 0
    lora_tokens: int = 0
    adapters: int = 0
    context_tokens: int = 0
    images: int = 0
    merged: int = 0


FEATURES = tuple(f.name for f in dataclasses.fields(StepFeatures))


def step_features(rows: Sequence[Request], mode: Mode, merged: str | None, *, prefill: bool) -> StepFeatures:
    """The features of a prefill of `rows` (their whole prompts) or a decode step of `rows` (one
    token each) in `mode` with `merged` folded in."""
    lora_tokens = context = images = tokens = 0
    adapters = set()
    corrected = False
    for r in rows:
        n = r.prompt_tokens if prefill else 1
        terms = lora_terms(mode, merged, r.adapter)
        tokens += n
        lora_tokens += n * terms
        if terms:
            if r.adapter is not None:
                adapters.add(r.adapter)
            corrected |= mode == "mixture"
        if prefill:
            images += r.images
        else:
            context += r.prompt_tokens + r.generated
    if corrected:
        adapters.add(merged)
    return StepFeatures(tokens, lora_tokens, len(adapters), context, images, int(merged is not None))


@dataclasses.dataclass(frozen=True)
class LinearCost:
    fixed_s: float = 0.0
    per_token_s: float = 0.0
    per_lora_token_s: float = 0.0
    per_adapter_s: float = 0.0
    per_context_token_s: float = 0.0
    per_image_s: float = 0.0
    per_merged_s: float = 0.0

    def seconds(self, f: StepFeatures) -> float:
        return (self.fixed_s + self.per_token_s * f.tokens + self.per_lora_token_s * f.lora_tokens
                + self.per_adapter_s * f.adapters + self.per_context_token_s * f.context_tokens
                + self.per_image_s * f.images + self.per_merged_s * f.merged)

    @classmethod
    def fit(cls, samples: Iterable[tuple[StepFeatures, float]]) -> LinearCost:
        """Non-negative least-squares coefficients (`scipy.optimize.nnls`: no cost is negative) from
        measured (features, seconds) samples; a feature that is 0 in every sample gets coefficient 0."""
        samples = list(samples)
        if not samples:
            raise ValueError("LinearCost.fit needs at least one (features, seconds) sample")
        x = np.array([[1.0, *(getattr(f, name) for name in FEATURES)] for f, _ in samples])
        y = np.array([s for _, s in samples], dtype=np.float64)
        coef, _ = scipy.optimize.nnls(x, y)
        return cls(*(float(c) for c in coef))


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """One measured engine step: each weight switch (op, seconds), the prefill's features and seconds
    (None / 0 when nothing was admitted) and the decode's (None / 0 when nothing was running)."""
    switch: tuple[tuple[str, float], ...]
    prefill: StepFeatures | None
    prefill_s: float
    decode: StepFeatures | None
    decode_s: float


@dataclasses.dataclass(frozen=True)
class CostProfile:
    name: str
    prefill: LinearCost
    decode: LinearCost
    merge_s: float
    unmerge_s: float
    direct_s: float | None = None  # one merged adapter to another ("switch_s" in the file)
    image_tokens: int = 0
    device: str = ""
    note: str = ""

    def prefill_s(self, rows: Sequence[Request], mode: Mode, merged: str | None) -> float:
        return self.prefill.seconds(step_features(rows, mode, merged, prefill=True)) if rows else 0.0

    def decode_s(self, rows: Sequence[Request], mode: Mode, merged: str | None) -> float:
        return self.decode.seconds(step_features(rows, mode, merged, prefill=False)) if rows else 0.0

    def op_s(self, op: str) -> float:
        """Seconds of one weight change: "merge", "unmerge" or "switch"."""
        if op == "switch":
            return self.merge_s + self.unmerge_s if self.direct_s is None else self.direct_s
        return self.merge_s if op == "merge" else self.unmerge_s

    def switch_s(self, ops: Sequence[tuple[str, str | None]]) -> float:
        return sum(self.op_s(op) for op, _ in ops)

    def to_json(self) -> dict:
        return {"name": self.name, "device": self.device, "note": self.note, "image_tokens": self.image_tokens,
                "prefill": dataclasses.asdict(self.prefill), "decode": dataclasses.asdict(self.decode),
                "switch": {"merge_s": self.merge_s, "unmerge_s": self.unmerge_s,
                           **({} if self.direct_s is None else {"switch_s": self.direct_s})}}

    @classmethod
    def from_json(cls, data: dict, *, source: str = "profile") -> CostProfile:
        try:
            return cls(name=data.get("name", source), device=data.get("device", ""), note=data.get("note", ""),
                       image_tokens=int(data.get("image_tokens", 0)),
                       prefill=LinearCost(**data["prefill"]), decode=LinearCost(**data["decode"]),
                       merge_s=float(data["switch"]["merge_s"]), unmerge_s=float(data["switch"]["unmerge_s"]),
                       direct_s=None if data["switch"].get("switch_s") is None else float(data["switch"]["switch_s"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: not a cost profile ({type(e).__name__}: {e}); expected keys "
                             f"prefill, decode, switch.merge_s, switch.unmerge_s; coefficients {FEATURES}") from e


def fit_profile(timings: Sequence[StepTiming], *, name: str, image_tokens: int, device: str = "",
                note: str = "") -> CostProfile:
    """A profile fitted to measured steps: prefill and decode by `LinearCost.fit`, merge, unmerge and
    (when measured) the direct switch as the median of their measured times (a switch's cost does not
    depend on the batch)."""
    prefill = [(t.prefill, t.prefill_s) for t in timings if t.prefill is not None]
    decode = [(t.decode, t.decode_s) for t in timings if t.decode is not None]
    ops = {op: [s for t in timings for o, s in t.switch if o == op] for op in ("merge", "unmerge")}
    direct = [s for t in timings for o, s in t.switch if o == "switch"]
    missing = [what for what, samples in (("prefill", prefill), ("decode", decode), *ops.items()) if not samples]
    if missing:
        raise ValueError(f"the measured steps have no {', '.join(missing)}: a profile needs every part timed")
    return CostProfile(name=name, device=device, note=note, image_tokens=image_tokens,
                       prefill=LinearCost.fit(prefill), decode=LinearCost.fit(decode),
                       merge_s=float(np.median(ops["merge"])), unmerge_s=float(np.median(ops["unmerge"])),
                       direct_s=float(np.median(direct)) if direct else None)


def load_profile(name_or_path: str | pathlib.Path) -> CostProfile:
    """A profile by file path, or by name from configs/profiles (e.g. "cpu-tiny")."""
    path = pathlib.Path(name_or_path)
    if not path.exists():
        path = PROFILES / f"{name_or_path}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.json")))
        raise FileNotFoundError(f"no cost profile {str(name_or_path)!r}: not a file and not one of {known}")
    return CostProfile.from_json(json.loads(path.read_text()), source=str(path))


def save_profile(profile: CostProfile, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(profile.to_json(), indent=2) + "\n")
