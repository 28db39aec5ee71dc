import io
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from qualityguide.errors import ImageError, InputError
from qualityguide.diffusion.vae import from_vae_range, to_vae_range
from qualityguide.images import (MultiFrameWarning, check_batch, collect_multi_frame, list_images, load_image,
                                 scan_images, to_batch)


def _save(tmp_path, name, image, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_rgb_png_exact(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    x = load_image(_save(tmp_path, "a.png", Image.fromarray(array)))
    assert x.shape == (3, 20, 30) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(array).permute(2, 0, 1).float() / 255)


def test_grayscale_replicated(tmp_path):
    array = np.arange(100, dtype=np.uint8).reshape(10, 10)
    x = load_image(_save(tmp_path, "g.png", Image.fromarray(array, "L")))
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert x[0, 0, 5].item() == pytest.approx(5 / 255)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255            # red
    rgba[:2, :, 3] = 255          # top half opaque, bottom transparent
    x = load_image(_save(tmp_path, "t.png", Image.fromarray(rgba, "RGBA")))
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(x[:, 3, 0], torch.ones(3))  # transparent -> white


def test_la_half_alpha(tmp_path):
    la = np.zeros((2, 2, 2), dtype=np.uint8)
    la[..., 1] = 128  # black at ~50% alpha over white -> ~0.5
    x = load_image(_save(tmp_path, "la.png", Image.fromarray(la, "LA")))
    assert torch.allclose(x, torch.full_like(x, 1 - 128 / 255), atol=1e-6)


def test_palette(tmp_path):
    image = Image.fromarray(np.full((5, 5, 3), (10, 200, 30), dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    x = load_image(_save(tmp_path, "p.png", image))
    assert torch.allclose(x[:, 0, 0], torch.tensor([10, 200, 30]) / 255, atol=1e-6)


def test_cmyk_jpeg(tmp_path):
    rgb = Image.fromarray(np.full((16, 16, 3), (200, 50, 50), dtype=np.uint8))
    path = _save(tmp_path, "c.jpg", rgb.convert("CMYK"), quality=95)
    assert Image.open(path).mode == "CMYK"
    x = load_image(path)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x.mean((1, 2)), torch.tensor([200, 50, 50]) / 255, atol=0.06)


def test_16bit_png(tmp_path):
    array = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    path = tmp_path / "d.png"
    Image.fromarray(array).save(path)
    x = load_image(path)
    assert torch.allclose(x[0], torch.from_numpy(array.astype(np.float32) / 65535), atol=1e-6)


def test_exif_orientation(tmp_path):
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "o.jpg"
    image.save(path, exif=exif.tobytes(), quality=100)
    x = load_image(path)
    assert x.shape == (3, 20, 10)  # portrait after transposition
    assert x[:, :5].mean() > 0.9 and x[:, -5:].mean() < 0.1  # left half moved to the top


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="nope.png: file not found"):
        load_image(tmp_path / "nope.png")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_and_device_are_named_not_called_empty(tmp_path):
    """A FIFO or a device given by name was "file is empty (0 bytes)"; opening a FIFO must not wait for a writer."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("opening the FIFO blocked"))
    signal.alarm(10)
    try:
        with pytest.raises(ImageError, match=r"pipe.png: is a FIFO \(named pipe\), not a regular file"):
            load_image(fifo)
    finally:
        signal.alarm(0)
    with pytest.raises(ImageError, match="/dev/null: is a character device, not a regular file"):
        load_image("/dev/null")


def test_truncated_file(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.png: truncated or corrupt"):
        load_image(path)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am text")
    with pytest.raises(ImageError, match="notes.jpg: not an image"):
        load_image(path)


def test_nan_and_inf():
    array = np.zeros((4, 4, 3), dtype=np.float32)
    array[0, 0, 0] = np.nan
    with pytest.raises(ImageError, match="NaN/inf"):
        load_image(array)
    with pytest.raises(ImageError, match="NaN/inf"):
        to_batch(torch.full((1, 3, 4, 4), float("inf")))


def test_float_0_255_rejected_with_fix():
    with pytest.raises(ImageError, match="divide by 255"):
        load_image(np.full((4, 4, 3), 200.0, dtype=np.float32))
    with pytest.raises(ImageError, match=r"\(x \+ 1\) / 2"):
        to_batch(torch.full((1, 3, 4, 4), -0.5))


def test_wrong_rank_and_channels():
    with pytest.raises(ImageError, match="4 dimensions|HW or HWC"):
        load_image(np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="channels"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))
    with pytest.raises(ImageError, match="permute"):
        to_batch(torch.zeros(1, 4, 4, 3))
    with pytest.raises(InputError, match=r"\[B,3,H,W\]"):
        check_batch(torch.zeros(3, 4, 4))


def test_too_small_for_scorer():
    with pytest.raises(ImageError, match="needs both sides >= 192"):
        check_batch(torch.zeros(1, 3, 100, 300), "x", min_side=192)


def test_numpy_and_tensor_paths_agree():
    array = np.random.default_rng(1).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    a = load_image(array)
    b = load_image(Image.fromarray(array))
    c = to_batch(torch.from_numpy(array).permute(2, 0, 1)[None])[0]
    d = load_image(array.astype(np.uint16) * 257)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.allclose(a, d, atol=1e-6)
    assert to_batch([array, array]).shape == (2, 3, 8, 9)
    with pytest.raises(InputError, match="share one size"):
        to_batch([array, array[:4]])


def test_vae_range_round_trip():
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(from_vae_range(to_vae_range(x)), x)
    assert to_vae_range(torch.zeros(1)).item() == -1 and to_vae_range(torch.ones(1)).item() == 1


def test_list_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "b.JPG", "sub/c.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images([tmp_path])] == ["a.png", "b.JPG"]
    assert sorted(p.name for p in list_images([tmp_path], recursive=True)) == ["a.png", "b.JPG", "c.png"]
    assert len(list_images([tmp_path / "a.png", tmp_path])) == 2  # de-duplicated


def test_symlink_loops_listed_and_reported(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "loop.png").symlink_to("loop.png")
    (tmp_path / "gone.png").symlink_to("missing.png")
    (tmp_path / "gone.txt").symlink_to("missing.txt")  # not an image name: not worth a report
    with pytest.warns(UserWarning, match=r"skipped 2 link\(s\).*gone.png \(broken symlink\).*loop.png \(symlink loop\)"):
        assert [p.name for p in list_images([tmp_path])] == ["a.png"]
    listing = scan_images([tmp_path / "loop.png"])  # given explicitly: kept, to be reported per file
    assert [p.name for p in listing.files] == ["loop.png"] and listing.keys == [str(tmp_path / "loop.png")]
    with pytest.raises(ImageError, match="loop.png: symlink loop"):
        load_image(tmp_path / "loop.png")


def test_multi_frame_file_gives_first_frame_with_a_warning(tmp_path):
    frames = [Image.new("RGB", (8, 8), (10 * i, 0, 0)) for i in range(1, 4)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(MultiFrameWarning, match="anim.gif: has 3 frames"):
        x = load_image(tmp_path / "anim.gif")
    assert x[0, 0, 0].item() == pytest.approx(10 / 255, abs=2 / 255)
    with collect_multi_frame() as found:  # scoring runs collect them for one notice instead
        load_image(tmp_path / "anim.gif")
    assert found == [str(tmp_path / "anim.gif")]


def test_decompression_bomb_is_an_image_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (50, 50)).save(tmp_path / "big.png")  # 2500 > 2 x 1000
    with pytest.raises(ImageError, match=r"big.png: 2,500 pixels is over .* --max-image-pixels 2500"):
        load_image(tmp_path / "big.png")


# ----------------------------------------------------------------------------------------------- grids
def _cells(n: int, h: int = 5, w: int = 7) -> torch.Tensor:
    """``n`` images of distinct, non-uniform content (8-bit exact), so a misplaced or flipped cell shows."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


def test_make_grid_places_each_image_in_its_cell():
    from qualityguide.images import make_grid

    images = _cells(5)
    grid = np.asarray(make_grid(images, columns=2, padding=3, background="white"))
    assert grid.shape == (3 + 3 * (5 + 3), 3 + 2 * (7 + 3), 3)
    for i in range(5):
        r, c = divmod(i, 2)
        y, x = 3 + r * 8, 3 + c * 10
        expected = (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(grid[y:y + 5, x:x + 7], expected)
    assert (grid[19:24, 13:20] == 255).all() and (grid[:3] == 255).all()  # the empty sixth cell and the border
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    assert np.array_equal(np.asarray(make_grid(pil, columns=2, padding=3, background="white")), grid)
    tight = np.asarray(make_grid(images, columns=2, padding=3, border=0, background="white"))
    assert tight.shape == (3 * 5 + 2 * 3, 2 * 7 + 3, 3) and np.array_equal(tight, grid[3:-3, 3:-3])


def test_make_grid_labels_add_bands_and_keep_the_cells():
    from qualityguide.images import make_grid

    images = _cells(4, h=20, w=24)
    plain = np.asarray(make_grid(images, columns=2))
    labelled = np.asarray(make_grid(images, columns=2, captions=["0.12", "0.34", "0.56", "0.78"],
                                    row_labels=["model a", "model b"], column_labels=["low", "high"],
                                    background="white"))
    top = next(y for y in range(labelled.shape[0]) if np.array_equal(labelled[y, -24:], plain[0, -24:]))
    left = labelled.shape[1] - plain.shape[1]
    caption_h = (labelled.shape[0] - top) // 2 - 20
    assert top > 0 and left > 0 and caption_h > 0  # a band for each kind of label
    for i in range(4):
        r, c = divmod(i, 2)
        y, x = top + r * (20 + caption_h), left + c * 24
        assert np.array_equal(labelled[y:y + 20, x:x + 24], plain[r * 20:(r + 1) * 20, c * 24:(c + 1) * 24])
        assert (labelled[y + 20:y + 20 + caption_h, x:x + 24] < 128).any()  # the caption is drawn under it
    assert (labelled[:top, left:] < 128).any() and (labelled[top:, :left] < 128).any()


@pytest.mark.parametrize("kwargs, match", [
    ({"columns": 0}, "columns=0"),
    ({"columns": 2, "captions": ["a"]}, "1 image captions for 3 images"),
    ({"columns": 2, "row_labels": ["a"]}, "1 row labels for 2 rows"),
    ({"columns": 2, "column_labels": ["a", "b", "c"]}, "3 column labels for 2 columns"),
    ({"columns": 2, "padding": -1}, "padding=-1"),
    ({"columns": 2, "border": -2}, "border=-2"),
])
def test_make_grid_refuses_bad_layouts(kwargs, match):
    from qualityguide.images import make_grid

    with pytest.raises(InputError, match=match):
        make_grid(_cells(3), **kwargs)
    with pytest.raises(InputError, match=r"image 0 is \(5, 7\)"):
        make_grid([torch.zeros(5, 7)], columns=1)
    with pytest.raises(InputError, match="no images"):
        make_grid([], columns=1)
