"""The demo data: the Palmer penguins as the quickstart trains on them."""

import lightning as L
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


def test_under_ddp_the_evaluation_sets_are_padded_with_samples_that_count_for_nothing():
    # 51 validation penguins on 2 ranks: Lightning's sampler would repeat one, counted twice.
    data = PenguinsDataModule(seed=0)
    data.setup("fit")
    data.trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    for loader, size in ((data.val_dataloader(), 51), (data.test_dataloader(), 52)):
        assert len(loader.dataset) == size + size % 2
        if size % 2:
            _, targets = loader.dataset[size]
            assert targets["species"].item() == -100
            assert targets["sex"].isnan() and targets["body_mass"].isnan()
    data.trainer = L.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False)
    assert len(data.test_dataloader().dataset) == 54
    assert len(data.predict_dataloader().dataset) == 52  # predictions of real penguins only
    data.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert len(data.val_dataloader().dataset) == 51
