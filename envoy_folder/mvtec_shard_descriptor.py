"""OpenFL ShardDescriptor for one site's MVTec AD shard (no torch; data access only).

The envoy builds it from ``shard_descriptor.params`` of its YAML config. The
data are checked and decoded here, at envoy start, so that bad data stop the
envoy with the reader's error before it contacts the director.
"""

from __future__ import annotations

import numpy as np
from openfl.interface.interactive_api.shard_descriptor import ShardDataset, ShardDescriptor

from patchsvdd.data.mvtec import (
    BUNDLE_FOLDER_LABEL,
    DEFECT_TYPES_LABEL,
    CategoryData,
    index_category,
    load_category,
    parse_rank_worldsize,
)
from patchsvdd.system.configs import resolve_data_folder


class MVTecShardDataset(ShardDataset):
    """One split of a shard. Items: (image uint8 (H,W,3), mask uint8 (H,W) of 0/1, label 0/1).

    ``names`` ('<defect type>/<stem>') and ``defect_types`` ('good' or the defect folder) per item:
    strings the envoy's tasks may report statistics by; they never leave as images do not.
    """

    def __init__(self, images, masks, labels, names, defect_types):
        self.images, self.masks, self.labels = images, masks, labels
        self.names, self.defect_types = list(names), list(defect_types)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.masks[index], int(self.labels[index])


class MVTecShardDescriptor(ShardDescriptor):
    """Shard ``rank_worldsize`` of ``<data_folder>/<category>``; shapes are read from the data.

    A relative ``data_folder`` is taken relative to the envoy config's folder, as is ``bundle_folder``:
    where this site's inspection bundles are written (``patchsvdd.federated.start_export``).
    """

    def __init__(
        self,
        data_folder: str,
        category: str,
        rank_worldsize: str = "1,1",
        image_size: int = 256,
        bundle_folder: str = "bundles",
    ) -> None:
        rank, world_size = parse_rank_worldsize(str(rank_worldsize))
        index = index_category(resolve_data_folder(data_folder), category).shard(rank, world_size)
        self.data: CategoryData = load_category(index, size=int(image_size))
        self.category, self.rank, self.world_size = category, rank, world_size
        self.bundle_folder = str(resolve_data_folder(bundle_folder).resolve())

    def get_dataset(self, dataset_type: str = "train") -> MVTecShardDataset:
        d = self.data
        if dataset_type == "train":  # all good: empty masks, label 0
            n = len(d.train_images)
            masks = np.zeros((n, *d.train_images.shape[1:3]), dtype=np.uint8)
            return MVTecShardDataset(
                d.train_images, masks, np.zeros(n, dtype=np.int64), [f"train/{i}" for i in range(n)], ["good"] * n
            )
        if dataset_type in ("test", "val"):
            return MVTecShardDataset(d.test_images, d.test_masks, d.test_labels, d.test_names, d.defect_types)
        raise ValueError(f"dataset_type {dataset_type!r}: expected 'train' or 'test'")

    @property
    def sample_shape(self) -> list[str]:
        return [str(s) for s in self.data.train_images.shape[1:]]

    @property
    def target_shape(self) -> list[str]:
        return [str(s) for s in self.data.test_masks.shape[1:]]

    @property
    def dataset_description(self) -> str:
        d = self.data
        return (
            f"MVTec AD '{self.category}', shard {self.rank}/{self.world_size}: {len(d.train_images)} training and "
            f"{len(d.test_images)} test images ({int(d.test_labels.sum())} defective)"
            f"; {DEFECT_TYPES_LABEL} {', '.join(sorted(set(d.defect_types) - {'good'})) or 'none'}"
            f"; {BUNDLE_FOLDER_LABEL} {self.bundle_folder}"
        )
