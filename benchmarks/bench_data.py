"""What the benchmarks train on: the split stage's data/prepared when it holds the params' sizes, else random
pixels of those sizes (seeded); the time a training step takes does not depend on what the pixels show."""

from __future__ import annotations

from pathlib import Path

import torch

from digitgen.data import Digits, load_split
from digitgen.params import Params

PREPARED = Path("data/prepared")


def training_data(params: Params) -> tuple[Digits, Digits]:
    """(train, val) of params.data's sizes."""
    if (PREPARED / "train.pt").is_file():
        train = load_split(PREPARED, "train")
        if len(train) == params.data.train_size:
            return train, load_split(PREPARED, "val")
    generator = torch.Generator().manual_seed(0)
    n = params.data.train_size + params.data.val_size
    digits = Digits(
        torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (n,), generator=generator),
    )
    cut = params.data.train_size
    return Digits(digits.images[:cut], digits.labels[:cut]), Digits(digits.images[cut:], digits.labels[cut:])
