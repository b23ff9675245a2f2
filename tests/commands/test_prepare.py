"""`python -m noah_jax.prepare`: the real TFDS imagenet2012 builder on tiny archives
written in the real ILSVRC2012 layout, then training and evaluation on the result
with main.py, exactly as the README's walkthrough runs them; and its refusals."""

import io
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from noah_jax import prepare  # noqa: E402

IMAGES_PER_SYNSET = 4
NUM_VAL = 6


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (36, 48, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def validation_synsets() -> list[str]:
    """The synset of each validation image, in file-name order, as TFDS ships them."""
    import tensorflow_datasets as tfds
    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().split()


def write_ilsvrc2012_archives(manual_dir: pathlib.Path, synsets: list[str]) -> None:
    """ILSVRC2012_img_train.tar (one tar per synset, of nXXXXXXXX_K.JPEG) and
    ILSVRC2012_img_val.tar (ILSVRC2012_val_%08d.JPEG, labelled by position)."""
    manual_dir.mkdir(parents=True)
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
        for s, synset in enumerate(synsets):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as per_synset:
                for k in range(IMAGES_PER_SYNSET):
                    _add(per_synset, f"{synset}_{k + 1}.JPEG", _jpeg(100 * s + k))
            _add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, NUM_VAL + 1):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(10_000 + i))


def test_readme_prepare_command_builds_imagenet_then_main_trains_and_evaluates(tmp_path):
    import tensorflow_datasets as tfds

    data_dir = tmp_path / "tfds"
    val_synsets = validation_synsets()[:NUM_VAL]
    train_synsets = sorted(set(val_synsets))
    write_ilsvrc2012_archives(data_dir / "downloads" / "manual", train_synsets)

    # The README's command, as written there (archives in DATA_DIR/downloads/manual).
    command = [sys.executable, "-m", "noah_jax.prepare", "imagenet2012",
               f"--data_dir={data_dir}"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"imagenet2012: prepared in {data_dir}/imagenet2012/5.1.0" in proc.stdout
    assert "examples, array_record)" in proc.stdout  # the default on a file system
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already prepared" in again.stdout

    # What the real builder wrote: every image, with the labels of the real layout.
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    names = builder.info.features["label"].names
    assert builder.info.splits["train"].num_examples == len(train_synsets) * IMAGES_PER_SYNSET
    assert builder.info.splits["validation"].num_examples == NUM_VAL
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    val = {r["file_name"].decode(): int(r["label"])
           for r in builder.as_data_source(split="validation")}
    assert val == {f"ILSVRC2012_val_{i + 1:08d}.JPEG": names.index(s)
                   for i, s in enumerate(val_synsets)}
    train = [(r["file_name"].decode(), int(r["label"]))
             for r in builder.as_data_source(split="train")]
    assert all(names[label] == file_name.split("_")[0] for file_name, label in train)

    # Training on it with the DeiT recipe (tiny model), evaluated on every val image.
    workdir = tmp_path / "run"
    command = [sys.executable, "main.py", "--config=configs/vit_noah.py:variant=tiny",
               f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
               "--config.dataset.image_size=32", "--config.model.overrides.img_size=32",
               "--config.model.overrides.depth=1", "--config.batch_size=8",
               "--config.eval_batch_size=8", "--config.num_epochs=0",
               "--config.total_steps=3", "--config.log_every_steps=1",
               "--config.checkpoint_every_steps=3", "--config.dataset.shuffle_buffer=64"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"test top-1: " in proc.stdout and f"({NUM_VAL} images)" in proc.stdout
    assert "Traceback" not in proc.stderr
    # The extra evaluations are not prepared: each is skipped with its whole command.
    for extra in ("imagenet_v2", "imagenet2012_real"):
        assert f"python -m noah_jax.prepare {extra} --data_dir={data_dir}" in proc.stderr
    # Each line once, on the console and in the run's log.
    assert proc.stderr.count("step 3: eval/loss") == 1
    assert "Unable to initialize backend" not in proc.stderr
    log = (workdir / "log.txt").read_text()
    assert log.count("step 3: eval/loss") == 1 and "step 3/3" in log
    assert f"eval/count {NUM_VAL}" in log and f"eval_ema/count {NUM_VAL}" in log


def test_missing_archives_are_named_before_any_work(tmp_path, capsys):
    assert prepare.main(["imagenet2012", f"--data_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    for needle in ("ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
                   f"{tmp_path}/downloads/manual", "image-net.org", "--manual_dir"):
        assert needle in err, (needle, err)
    assert not (tmp_path / "imagenet2012").exists()


def test_a_disk_too_small_is_refused_with_the_space_needed(tmp_path, capsys, monkeypatch):
    manual = tmp_path / "manual"
    write_ilsvrc2012_archives(manual, ["n01440764"])
    archives = sum(p.stat().st_size for p in manual.iterdir())
    monkeypatch.setattr(prepare, "_free_bytes", lambda path: archives / 2)
    args = ["imagenet2012", f"--data_dir={tmp_path / 'tfds'}", f"--manual_dir={manual}"]
    assert prepare.main(args) == 1
    err = capsys.readouterr().err
    assert "are free on the disk" in err and "--skip_disk_check" in err
    # A download that cannot fit is refused from the registered sizes.
    assert prepare.main(["coco/2017", f"--data_dir={tmp_path / 'tfds'}"]) == 1
    assert "54 GB" in capsys.readouterr().err


def test_unknown_dataset_names_list_the_known_ones(tmp_path, capsys):
    assert prepare.main(["imagenet2021", f"--data_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "unknown dataset 'imagenet2021'" in err and "coco/2017" in err


@pytest.mark.parametrize("name", ["imagenet2012", "coco/2017", "voc/2007"])
def test_the_not_prepared_message_gives_the_prepare_command(tmp_path, name):
    from noah_jax.data import tfds_source
    with pytest.raises(tfds_source.DatasetNotPreparedError) as e:
        tfds_source.prepared_builder(name, str(tmp_path))
    assert f"python -m noah_jax.prepare {name} --data_dir={tmp_path}" in str(e.value)


def test_a_wrong_archive_in_the_manual_dir_is_named(tmp_path, capsys):
    """VOC from its archives in the manual dir (the offline route): the real builder
    checks them against TFDS's registered checksums, and a wrong file is named."""
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for name in ("VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"):
        with tarfile.open(manual / name, "w") as tar:
            _add(tar, "VOCdevkit/README", b"not the real archive")
    assert prepare.main(["voc/2007", f"--data_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not the official file" in err and str(manual) in err
    assert "host.robots.ox.ac.uk" in err
