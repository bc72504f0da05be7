"""A deterministic synthetic stream (class-coloured noise): smoke tests, benchmarks, runs without a corpus.

It satisfies `pretrain.data.cursor.BatchStream` with the keys `image`, `label`, `caption`, `has_caption`,
`source` and `valid`; its cursor is the batch index.
"""

from __future__ import annotations

import torch


class SyntheticStream:
    """Deterministic, learnable batches: each class is a fixed colour pattern plus noise.

    Batch `i` of rank `r` depends only on (seed, r, i), so the cursor is just `i` and a resumed stream is
    identical to an uninterrupted one.
    """

    batch_size: int
    image_size: int

    def __init__(self, batch_size: int, image_size: int, num_classes: int, seed: int = 0, rank: int = 0):
        self.batch_size, self.image_size, self.num_classes = batch_size, image_size, num_classes
        self.seed, self.rank = seed, rank
        self.index = 0
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, 4, 4, generator=g)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank * 10_007 + self.index) % (2**63))
        self.index += 1
        b, s = self.batch_size, self.image_size
        label = torch.randint(0, self.num_classes, (b,), generator=g)
        base = torch.nn.functional.interpolate(self.patterns[label], size=(s, s), mode="nearest")
        image = base + 0.5 * torch.randn(b, 3, s, s, generator=g)
        return {
            "image": image,
            "label": label,
            "caption": [f"a picture of pattern {int(k)}" for k in label],
            "has_caption": torch.ones(b, dtype=torch.bool),
            "source": torch.zeros(b, dtype=torch.long),
            "valid": torch.ones(b, dtype=torch.bool),
        }

    def state_dict(self) -> dict:
        return {"index": self.index}

    def load_state_dict(self, state: dict) -> None:
        if "index" not in state:
            raise ValueError(
                f"not a synthetic stream's state (keys {sorted(state)}): saved by a corpus reader?"
            )
        self.index = int(state["index"])

    def counters(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass

    def info(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "label_names": [f"pattern {k}" for k in range(self.num_classes)],
        }
