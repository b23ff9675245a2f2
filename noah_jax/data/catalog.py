"""The TFDS datasets this project knows, without importing TensorFlow: their splits,
class counts, labels and what preparing them needs (archives, disk).

`noah_jax/data/tfds_source.py` reads them, `noah_jax/prepare.py` builds them, and the
configs take class counts from here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from noah_jax.data.base import CLASS_IDS, MULTI_HOT, REAL_LABELS


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    tfds_name: str
    train_split: str | None   # None: evaluation only
    eval_split: str
    num_classes: int
    # What the labels are (noah_jax/data/base.py's label types) and the record feature
    # that holds them: a ClassLabel, or a sequence of ClassLabel ids ('/' walks into a
    # nested feature) that tfds_source turns into multi-hot rows.
    label_type: str = CLASS_IDS
    label_feature: str = "label"
    # Preparing it (`python -m noah_jax.prepare`): the archives that must already lie in
    # manual_dir (ImageNet's cannot be downloaded), those that may lie there instead of
    # being downloaded (TFDS's own file names), where they come from, and the disk space
    # and time a build takes.
    manual_files: tuple[str, ...] = ()
    optional_manual_files: tuple[str, ...] = ()
    source: str = ""
    disk: str = ""
    disk_gb: float = 0.0      # the whole footprint, archives included (0: unknown)

    @property
    def multilabel(self) -> bool:
        return self.label_type == MULTI_HOT


_IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
# Archive sizes are TFDS's registered ones; a built dataset takes about as much again,
# since the TFRecords keep the JPEG bytes as they are.
DATASETS: dict[str, DatasetSpec] = {
    "imagenet2012": DatasetSpec(
        "imagenet2012", "train", "validation", 1000, manual_files=_IMAGENET_ARCHIVES,
        source="https://image-net.org/download-images (free registration)",
        disk="about 310 GB: 155 GB of archives plus about 155 GB of TFRecords; "
             "the build takes hours", disk_gb=310),
    "imagenet_v2": DatasetSpec("imagenet_v2", None, "test", 1000,
                               disk="about 2.5 GB (1.2 GB download)", disk_gb=2.5),
    "imagenet2012_real": DatasetSpec(
        "imagenet2012_real", None, "validation", 1000, REAL_LABELS, "real_label",
        manual_files=("ILSVRC2012_img_val.tar",), optional_manual_files=("real.json",),
        source="https://image-net.org/download-images, and the ReaL labels from "
               "https://github.com/google-research/reassessed-imagenet",
        disk="about 7 GB of TFRecords besides the 6.7 GB validation archive", disk_gb=14),
    "coco/2017": DatasetSpec(
        "coco/2017", "train", "validation", 80, MULTI_HOT, "objects/label",
        optional_manual_files=("train2017.zip", "val2017.zip", "test2017.zip",
                               "annotations_trainval2017.zip", "image_info_test2017.zip"),
        source="https://cocodataset.org/#download",
        disk="about 54 GB: 27 GB of archives plus about 27 GB of TFRecords", disk_gb=54),
    "voc/2007": DatasetSpec(
        "voc/2007", "train+validation", "test", 20, MULTI_HOT, "labels",
        optional_manual_files=("VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"),
        source="http://host.robots.ox.ac.uk/pascal/VOC/voc2007/",
        disk="about 2 GB: 0.9 GB of archives plus about 0.9 GB of TFRecords", disk_gb=2),
    "cifar10": DatasetSpec("cifar10", "train", "test", 10, disk="about 0.3 GB", disk_gb=0.3),
    "cifar100": DatasetSpec("cifar100", "train", "test", 100, disk="about 0.3 GB",
                            disk_gb=0.3),
    "imagenette": DatasetSpec("imagenette", "train", "validation", 10, disk="about 3 GB",
                              disk_gb=3),
    "oxford_iiit_pet": DatasetSpec("oxford_iiit_pet", "train", "test", 37,
                                   disk="about 1.6 GB", disk_gb=1.6),
}


def default_data_dir(data_dir: str = "") -> str:
    return data_dir or "~/tensorflow_datasets"


def default_manual_dir(data_dir: str = "") -> str:
    """Where TFDS (and `noah_jax.prepare`) look for manually downloaded archives."""
    return f"{default_data_dir(data_dir).rstrip('/')}/downloads/manual"


def prepare_command(name: str, data_dir: str = "") -> str:
    """The command that prepares `name` in `data_dir`, as the README gives it."""
    return f"python -m noah_jax.prepare {name} --data_dir={default_data_dir(data_dir)}"


def imagenet_class_names() -> list[str]:
    """ImageNet-1k's 1000 class names in label order: WordNet synset ids ('n01440764',
    'n01443537', ...), sorted, which is the order of TFDS's imagenet2012 labels and of
    the folder-per-class datasets the reference trained on. Read from the list the
    tensorflow_datasets package ships (found without importing it, so no TensorFlow).
    TFDS ships no human-readable ImageNet names; `python -m noah_jax.convert
    --class-names FILE` records your own."""
    spec = importlib.util.find_spec("tensorflow_datasets")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, "datasets", "imagenet2012", "labels.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip()]
    raise FileNotFoundError("tensorflow_datasets/datasets/imagenet2012/labels.txt, the "
                            "ImageNet class list, is not installed; install "
                            "requirements.txt")
