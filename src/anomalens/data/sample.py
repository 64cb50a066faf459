"""The one sample type and the one batch type that flow from disk to the model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

GOOD, DEFECT, UNKNOWN = 0, 1, -1


@dataclass(frozen=True)
class ImageRecord:
    """Where an image lives and what we know about it, before it is read."""

    path: str
    label: int = UNKNOWN  # GOOD, DEFECT or UNKNOWN
    defect_type: str = ""  # "good", a defect folder name, or "" when unknown
    mask_path: str | None = None


@dataclass
class Sample:
    """One image ready for a model. image: (3, H, W) float32 in [0, 1]; mask: (1, H, W) in {0, 1}."""

    image: torch.Tensor
    label: int
    path: str
    defect_type: str = ""
    mask: torch.Tensor | None = None


@dataclass
class Batch:
    """A stack of samples. mask is all-zero where a sample has none; has_mask says which do."""

    image: torch.Tensor  # (B, 3, H, W)
    label: torch.Tensor  # (B,) long
    mask: torch.Tensor  # (B, 1, H, W)
    has_mask: torch.Tensor  # (B,) bool
    path: list[str] = field(default_factory=list)
    defect_type: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.image.shape[0]

    @staticmethod
    def collate(samples: list[Sample]) -> Batch:
        images = torch.stack([s.image for s in samples])
        _, _, h, w = images.shape
        masks = torch.stack([s.mask if s.mask is not None else torch.zeros(1, h, w) for s in samples])
        return Batch(
            image=images,
            label=torch.tensor([s.label for s in samples], dtype=torch.long),
            mask=masks,
            has_mask=torch.tensor([s.mask is not None for s in samples], dtype=torch.bool),
            path=[s.path for s in samples],
            defect_type=[s.defect_type for s in samples],
        )

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.image.to(device), self.label.to(device), self.mask.to(device),
                     self.has_mask.to(device), self.path, self.defect_type)


def images_of(batch: Batch | torch.Tensor) -> torch.Tensor:
    """The images of a Batch, or the tensor itself: the one-pass models' fit takes either."""
    return batch.image if isinstance(batch, Batch) else batch
