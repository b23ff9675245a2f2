"""python -m noah_jax.visualize on checkpoints the trainer wrote: files, sizes, errors."""

import importlib
import re

import numpy as np
import pytest
from PIL import Image

from helpers import readme_commands, set_fields
from noah_jax import figures, visualize
from noah_jax.train import trainer


def tiny_demo(workdir, head, family="vit"):
    """A demo recipe shrunk to 3 steps of a 1-block model: the ViT (4 NOAH heads), or
    the Mixer, whose baseline pools tokens (a DeiT baseline reads its class token only,
    which has no map)."""
    c = importlib.import_module(f"configs.{family}_noah").get_config(f"demo,head={head}")
    depth = {"vit": "depth", "mixer": "num_blocks"}[family]
    set_fields(c, **{f"model__overrides__{depth}": 1}, num_epochs=0.0, total_steps=3,
               batch_size=16, eval_batch_size=120, log_every_steps=3, eval_every_steps=3,
               checkpoint_every_steps=3, attention_figure_images=0)
    trainer.train_and_evaluate(c, str(workdir))
    return workdir


def write_digits(folder, count=2):
    """Embedded test digits as grey PNGs (17 levels 0..16 -> 0..255)."""
    from sklearn.datasets import load_digits
    folder.mkdir(parents=True)
    digits = load_digits()
    for i in range(count):
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"digit{i}.png")
    return folder


@pytest.fixture(scope="module")
def noah_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("noah")
    return tiny_demo(root / "work", "noah"), write_digits(root / "digits")


def size(path):
    with Image.open(path) as png:
        return png.size


def test_noah_figures_show_the_chosen_heads_and_classes(noah_run, tmp_path):
    workdir, digits = noah_run
    out = tmp_path / "out"
    assert visualize.main([str(workdir), str(digits), "--out", str(out),
                           "--heads", "0,2"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["0000_digit0_head0.png", "0000_digit0_head2.png",
                       "0000_digit0_heads.png", "0001_digit1_head0.png",
                       "0001_digit1_head2.png", "0001_digit1_heads.png"]
    assert size(out / "0000_digit0_heads.png") == figures.figure_size(1, 1 + 2)  # 2 heads
    assert size(out / "0000_digit0_head2.png") == figures.figure_size(1, 1 + 5)  # top-5

    out = tmp_path / "classes"
    assert visualize.main([str(workdir), str(digits / "digit1.png"), "--out", str(out),
                           "--classes", "3,7", "--grad-cam"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "0000_digit1_gradcam.png", "0000_digit1_head0.png", "0000_digit1_heads.png"]
    assert size(out / "0000_digit1_heads.png") == figures.figure_size(1, 1 + 4)  # all heads
    assert size(out / "0000_digit1_head0.png") == figures.figure_size(1, 1 + 2)
    assert size(out / "0000_digit1_gradcam.png") == figures.figure_size(1, 1 + 2)


def test_a_linear_head_gets_grad_cam_plus_plus(tmp_path):
    workdir = tiny_demo(tmp_path / "work", "linear", family="mixer")
    digits = write_digits(tmp_path / "digits", count=1)
    out = tmp_path / "out"
    assert visualize.main([str(workdir), str(digits), "--out", str(out)]) == 0
    [figure] = out.iterdir()
    assert figure.name == "0000_digit0_gradcam.png"
    assert size(figure) == figures.figure_size(1, 1 + 5)
    with Image.open(figure) as png:
        assert np.asarray(png.convert("L")).std() > 20  # drawn, not blank


@pytest.mark.parametrize("case", ["unknown_class", "no_checkpoint", "unreadable_image",
                                  "no_such_head", "class_token_baseline"])
def test_mistakes_end_in_one_line(noah_run, tmp_path, capsys, case):
    workdir, digits = noah_run
    args = [str(workdir), str(digits), "--out", str(tmp_path / "out")]
    expected = {
        "unknown_class": r"--classes: the model has no class 'eight'",
        "no_checkpoint": r"no checkpoint",
        "unreadable_image": r"broken\.png",
        "no_such_head": r"--heads=9: give 'all' or head indices 0\.\.3",
        "class_token_baseline": r"deit_tiny_patch16_224 head=linear: the head receives "
                                r"features of shape \(1, 192\), with no positions",
    }[case]
    if case == "unknown_class":
        args += ["--classes", "3,eight"]
    elif case == "no_checkpoint":
        (tmp_path / "empty").mkdir()
        args[0] = str(tmp_path / "empty")
    elif case == "unreadable_image":
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        args[1] = str(tmp_path / "broken.png")
    elif case == "no_such_head":
        args += ["--heads", "9"]
    else:
        args[0] = str(tiny_demo(tmp_path / "linear", "linear"))
    assert visualize.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("python -m noah_jax.visualize: error: ")
    assert re.search(expected, err), err


def test_the_readmes_figure_command_runs_on_a_demo_checkpoint(noah_run, tmp_path, monkeypatch):
    """README.md's `python -m noah_jax.visualize` command, taken literally, with a short
    demo run as runs/demo and digits at the paths it names."""
    [args] = readme_commands("python -m noah_jax.visualize")
    workdir, digits = noah_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(workdir)
    images = [a for a in args[1:] if a.endswith(".png")]
    assert args[0] == "runs/demo" and images
    for image in images:
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / image).write_bytes((digits / "digit0.png").read_bytes())
    assert visualize.main(args) == 0
    out = tmp_path / args[args.index("--out") + 1]
    assert len(list(out.glob("*_heads.png"))) == len(images)
