"""noah_jax.figures: valid PNGs of the documented pixel size whose panels show the maps
where they are, for a CNN, a ViT and a Mixer."""

import jax
import numpy as np
import pytest
from helpers import TINY_MODELS, tiny_model
from PIL import Image

from noah_jax.models import explain
from noah_jax import figures

# Panels are 250 x 300 pixels: a 50-pixel title band over a 240-pixel picture square
# centred in the remaining 250 x 250 (5-pixel margins).
PANEL_W, PANEL_H, PICTURE_TOP, PICTURE_SIDE = 250, 300, 55, 240
GREY = np.full((48, 48, 3), 0.5, np.float32)  # lets the overlay alone set the colours


def read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert("RGB"), np.float64)


def picture(pixels, row, column):
    """The picture square of a panel."""
    top, left = row * PANEL_H + PICTURE_TOP, column * PANEL_W + 5
    return pixels[top:top + PICTURE_SIDE, left:left + PICTURE_SIDE]


def redness_by_cell(square, grid=3):
    """Mean (red - blue) over the middle of each cell of a grid x grid picture square."""
    cell = square.shape[0] / grid
    out = np.zeros((grid, grid))
    for i in range(grid):
        for j in range(grid):
            y, x = int((i + 0.3) * cell), int((j + 0.3) * cell)
            block = square[y:y + int(0.4 * cell), x:x + int(0.4 * cell)]
            out[i, j] = (block[..., 0] - block[..., 2]).mean()
    return out


def assert_hot_at(square, cell):
    """Over grey, 'jet' draws 1 red and 0 blue: the hot cell is the only red one."""
    redness = redness_by_cell(square)
    others = np.delete(redness.ravel(), np.ravel_multi_index(cell, (3, 3)))
    assert redness[cell] > 40 and others.max() < -20, redness


# Designed maps [N=4, K=6, 3, 3]: head n looks at cell HOT[n][k] for class k, nowhere else.
HOT = [[((n + k) % 3, (2 * n + k) % 3) for k in range(6)] for n in range(4)]
MAPS = np.zeros((4, 6, 3, 3), np.float32)
for n in range(4):
    for k in range(6):
        MAPS[(n, k, *HOT[n][k])] = 1.0
CONTRIBUTIONS = np.arange(24, dtype=np.float32).reshape(4, 6) - 10
PROBABILITIES = np.array([0.1, 0.05, 0.4, 0.15, 0.2, 0.1], np.float32)


def test_each_head_s_map_is_drawn_where_it_is(tmp_path):
    path = figures.heads_figure(tmp_path / "a" / "heads.png", GREY, MAPS, CONTRIBUTIONS,
                                PROBABILITIES, class_names=[f"cat{i}" for i in range(6)])
    assert path == tmp_path / "a" / "heads.png"
    pixels = read_png(path)
    assert pixels.shape == (PANEL_H, 5 * PANEL_W, 3)   # the image and 4 heads
    assert picture(pixels, 0, 0).std() < 1             # the grey image, no overlay
    assert pixels[:PICTURE_TOP].min() < 100            # title text in the band
    for n in range(4):                                 # class 2, the most probable
        assert_hot_at(picture(pixels, 0, n + 1), HOT[n][2])
    pixels = read_png(figures.heads_figure(tmp_path / "k4.png", GREY, MAPS, CONTRIBUTIONS,
                                           PROBABILITIES, class_index=4))
    for n in range(4):
        assert_hot_at(picture(pixels, 0, n + 1), HOT[n][4])


def test_one_head_s_maps_are_drawn_per_class(tmp_path):
    pixels = read_png(figures.classes_figure(tmp_path / "b.png", GREY, MAPS, CONTRIBUTIONS,
                                             PROBABILITIES, head=3, classes=[5, 0, 3]))
    assert pixels.shape == (PANEL_H, 4 * PANEL_W, 3)
    for j, k in enumerate([5, 0, 3]):
        assert_hot_at(picture(pixels, 0, j + 1), HOT[3][k])
    # By default the five most probable classes, most probable first.
    pixels = read_png(figures.classes_figure(tmp_path / "top.png", GREY, MAPS, CONTRIBUTIONS,
                                             PROBABILITIES, head=1))
    assert pixels.shape == (PANEL_H, 6 * PANEL_W, 3)
    for j, k in enumerate([2, 4, 3, 0, 5]):
        assert_hot_at(picture(pixels, 0, j + 1), HOT[1][k])


def test_rows_of_maps_are_drawn_row_by_row(tmp_path):
    cams = 3.0 * MAPS[0, [1, 4]]                       # any non-negative scale
    pixels = read_png(figures.grad_cam_figure(tmp_path / "cam.png", GREY, cams, [1, 4]))
    assert pixels.shape == (PANEL_H, 3 * PANEL_W, 3)
    assert_hot_at(picture(pixels, 0, 1), HOT[0][1])
    assert_hot_at(picture(pixels, 0, 2), HOT[0][4])
    rows = [("baseline", cams, None), ("NOAH head 2", MAPS[2, [1, 4]], PROBABILITIES)]
    pixels = read_png(figures.comparison_figure(tmp_path / "c.png", GREY, rows, [1, 4]))
    assert pixels.shape == (2 * PANEL_H, 3 * PANEL_W, 3)
    assert_hot_at(picture(pixels, 1, 1), HOT[2][1])
    assert_hot_at(picture(pixels, 1, 2), HOT[2][4])
    with pytest.raises(ValueError, match="3 maps for 2 classes"):
        figures.comparison_figure(tmp_path / "bad.png", GREY, [("x", MAPS[0, :3], None)], [1, 4])


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def case(request):
    model, variables, images = tiny_model(request.param, batch=1)
    e = explain.explain(model, variables, images)
    cams = explain.grad_cam_plus_plus(model, variables, images, [0, 1])
    return images[0], e, np.asarray(cams[0]), np.asarray(jax.nn.softmax(e.logits[0]))


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_every_figure_of_a_model_s_maps(case, tmp_path):
    image, e, cams, probabilities = case
    attention, contributions = np.asarray(e.attention[0]), np.asarray(e.contributions[0])
    drawn = {
        "heads": figures.heads_figure(tmp_path / "heads.png", image, attention, contributions,
                                      probabilities, mean=MEAN, std=STD),
        "classes": figures.classes_figure(tmp_path / "classes.png", image, attention,
                                          contributions, probabilities, head=0, classes=[0, 1]),
        "cam": figures.grad_cam_figure(tmp_path / "cam.png", image, cams, [0, 1],
                                       probabilities, mean=MEAN, std=STD),
        "compare": figures.comparison_figure(
            tmp_path / "compare.png", image,
            [("Grad-CAM++", cams, probabilities), ("NOAH head 0", attention[0, :2], None)],
            [0, 1], mean=MEAN, std=STD),
    }
    sizes = {"heads": (PANEL_H, 5 * PANEL_W), "classes": (PANEL_H, 3 * PANEL_W),
             "cam": (PANEL_H, 3 * PANEL_W), "compare": (2 * PANEL_H, 3 * PANEL_W)}
    for name, path in drawn.items():
        pixels = read_png(path)
        assert pixels.shape == (*sizes[name], 3), name
        assert pixels.std() > 20, name                 # not blank
        assert picture(pixels, 0, 0).std() > 20, name  # the (noise) input image is there
    pixels = read_png(drawn["heads"])
    heads = [picture(pixels, 0, n + 1) for n in range(4)]
    for n in range(4):                                 # each head its own map
        for m in range(n):
            assert np.abs(heads[n] - heads[m]).mean() > 1


def test_figure_size_and_display_image():
    assert figures.figure_size(2, 5) == (1250, 600)
    image = np.random.default_rng(0).uniform(size=(4, 5, 3))
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    np.testing.assert_allclose(figures.display_image((image - mean) / std, mean, std), image,
                               atol=1e-6)
    np.testing.assert_array_equal(figures.display_image(np.full((2, 2, 1), 1.7)),
                                  np.ones((2, 2, 3)))
    with pytest.raises(ValueError, match="both"):
        figures.display_image(image, mean=mean)
