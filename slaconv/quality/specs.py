"""Methods shared by the video specs of the benchmark's sources (SynthVideo, PhotoVideo)."""

from __future__ import annotations

from dataclasses import asdict


class SpecMethods:
    """Token count and dict round trip of a frozen dataclass spec with ``frames`` and ``size`` fields."""

    def tokens(self, patch=(1, 2, 2)) -> int:
        return (self.frames // patch[0]) * (self.size // patch[1]) * (self.size // patch[2])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
