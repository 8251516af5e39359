"""The house-price model on 2 CPU processes (DDP over gloo).

Every step reduces the task losses of both ranks with one all-reduce, so the global price and type
losses (and the gradients) are exactly those of one process on the union of the two batches. Each
rank takes 64 houses a step, a global batch of 128 as in house_prices.py: the figures printed are
close to that script's, not equal (the distributed sampler shuffles the houses in another order).

    python examples/ddp.py
"""

from __future__ import annotations

from house_prices import main

if __name__ == "__main__":
    main(accelerator="cpu", devices=2, strategy="ddp")
