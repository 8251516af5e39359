"""The demo data: the Palmer penguins as the quickstart trains on them."""

import torch

from lightning_lossagg.demos import PenguinsDataModule


def test_penguins_are_standardised_with_train_statistics_and_missing_sex_is_kept():
    data = PenguinsDataModule(seed=0)
    data.setup("fit")
    sizes = {split: len(data.splits[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 239, "val": 51, "test": 52}  # 70/15/15 of the 342 measured
    train = data.splits["train"]
    measured = train.features[:, :3]  # bill length, bill depth, flipper length
    torch.testing.assert_close(measured.mean(0), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(measured.std(0), torch.ones(3), rtol=0, atol=1e-5)
    mass = train.targets["body_mass"]
    assert abs(mass.mean().item()) < 1e-5 and abs(mass.std().item() - 1) < 1e-5
    # A penguin without a recorded sex stays, its "sex" label missing (NaN): 9 of them.
    sex = torch.cat([data.splits[split].targets["sex"] for split in sizes])
    assert int(sex.isnan().sum()) == 9
