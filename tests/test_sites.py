"""Sites made from one category (data/sites.py): the split, each site's acquisition, the written category."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from patchsvdd.data.mvtec import index_category, load_category
from patchsvdd.data.sites import Acquisition, split_sites, write_site
from patchsvdd.errors import MVTecDataError


def test_the_split_gives_each_site_its_fraction_of_training_and_an_equal_stratified_test_share(tiny_root) -> None:
    index = index_category(tiny_root, "fabric")  # 8 training images; 3 good and 2 of each defect type to test
    sites = split_sites(index, (0.5, 0.25, 0.25), seed=1)
    assert [len(site.train) for site in sites] == [4, 2, 2]
    trained = [path for site in sites for path in site.train]
    assert sorted(trained) == sorted(index.train)  # no image twice, none left out
    tested = [sample for site in sites for sample in site.test]
    assert sorted(s.image for s in tested) == sorted(s.image for s in index.test)
    sizes = [len(site.test) for site in sites]
    assert max(sizes) - min(sizes) <= len(index.defect_types) + 1  # round-robin per type
    for kind in index.defect_types:  # each type with 2 samples lands on 2 sites, not one
        assert sum(any(s.defect_type == kind for s in site.test) for site in sites) == 2
    assert split_sites(index, (0.5, 0.25, 0.25), seed=1) == sites  # seeded
    assert split_sites(index, (0.5, 0.25, 0.25), seed=2) != sites


def test_a_split_that_leaves_a_site_too_few_images_is_refused_with_the_folder(tiny_root) -> None:
    index = index_category(tiny_root, "fabric")
    with pytest.raises(MVTecDataError, match=r"fabric/train/good: 8 training images cannot give every site"):
        split_sites(index, (0.9, 0.1))
    with pytest.raises(ValueError, match="summing to 1"):
        split_sites(index, (0.5, 0.4))


def test_an_acquisition_is_seeded_and_strength_zero_is_the_identity() -> None:
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert Acquisition.drawn(3) == Acquisition.drawn(3) != Acquisition.drawn(4)
    assert Acquisition.drawn(3, strength=0.0) == Acquisition()
    np.testing.assert_array_equal(Acquisition().image(image), image)
    cast = Acquisition(gains=(1.2, 1.0, 0.8), gamma=1.0).image(np.full((4, 4, 3), 100, np.uint8))
    assert cast[0, 0].tolist() == [120, 100, 80]
    darker = Acquisition(gamma=2.0).image(np.full((4, 4, 3), 128, np.uint8))
    assert darker[0, 0, 0] == round(255 * (128 / 255) ** 2)


def test_the_mask_turns_with_the_image() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    image[10:20, 40:56] = 255
    mask[10:20, 40:56] = 1
    turned = Acquisition(rotation=30.0)
    bright = turned.image(image)[..., 0] > 127
    moved = turned.mask(mask).astype(bool)
    assert not np.array_equal(moved, mask.astype(bool))
    assert (bright & moved).sum() / moved.sum() > 0.9


def test_a_written_site_is_a_category_with_the_sites_images_through_its_acquisition(tiny_root, tmp_path: Path) -> None:
    index = index_category(tiny_root, "fabric")
    site = split_sites(index, (0.5, 0.5), seed=0)[1]
    acquisition = Acquisition(gains=(1.1, 0.9, 1.0), blur=0.8, rotation=2.0)
    written = write_site(site, tmp_path / "site2", acquisition)
    assert (len(written.train), len(written.test)) == (len(site.train), len(site.test))
    assert sorted(s.defect_type for s in written.test) == sorted(s.defect_type for s in site.test)
    original, copy = load_category(site), load_category(written)
    np.testing.assert_array_equal(copy.test_labels, original.test_labels)
    assert abs(copy.train_images.astype(int) - original.train_images).mean() > 1  # its own camera
    np.testing.assert_array_equal(copy.train_images[0], acquisition.image(original.train_images[0]))
    with pytest.raises(FileExistsError, match="site2/fabric"):
        write_site(site, tmp_path / "site2")
