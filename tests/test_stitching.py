"""Part maps go back where their parts were cut: for every mode, every method and both kinds of task, on a
small volume with real networks (no training needed: the geometry is what is tested)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from clinicadl_app.core.config import Extraction
from clinicadl_app.group.attribution import RECONSTRUCTION_ERROR, image_map, vote_factors
from clinicadl_app.group.data import ImageStore, PartDataset, part_spec
from clinicadl_app.group.networks import build_network
from clinicadl_app.images.modes import patch_grid
from clinicadl_app.images.stitching import Canvas
from clinicadl_app.layouts.caps import Caps

SHAPE = (40, 44, 36)
BOXES = {"leftHalf": np.s_[2:20, 3:40, 2:30], "rightHalf": np.s_[20:38, 4:41, 1:33]}


@pytest.fixture()
def setting(tmp_path):
    """One image tensor and a CAPS with two ROI masks of different boxes (left and right halves)."""
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, *SHAPE), dtype=np.float32))
    path = tmp_path / "image.pt"
    torch.save(image, path)
    caps = Caps(tmp_path / "caps")
    for name, box in BOXES.items():
        mask = np.zeros(SHAPE, np.uint8)
        mask[box] = 1
        caps.mask(name, True).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(caps.mask(name, True)))
    return ImageStore([path]), caps


EXTRACTIONS = {
    "image": Extraction(),
    "patch": Extraction(modes=("patch",), patch_size=20, stride_size=12),  # overlapping patches
    "slice": Extraction(modes=("slice",), slice_direction=1, slice_mode="rgb", discarded_slices=(3, 5)),
    "roi": Extraction(modes=("roi",), roi_list=("leftHalf", "rightHalf"), roi_uncrop_output=True),
    "roi-cropped": Extraction(modes=("roi",), roi_list=("leftHalf", "rightHalf")),
}


def _spec(mode: str, store: ImageStore, caps: Caps):
    return part_spec(mode.split("-")[0], SHAPE, EXTRACTIONS[mode], caps)


@pytest.mark.parametrize("mode", list(EXTRACTIONS))
def test_parts_placed_back_rebuild_the_image_where_they_cover_it(mode, setting):
    store, caps = setting
    spec = _spec(mode, store, caps)
    image = store.image(0)
    canvas = Canvas(SHAPE)
    for part in spec.ids:
        region, values = spec.place(part, spec.cut(image, part).mean(0).numpy())
        canvas.add(region, values)
    covered = canvas.covered
    truth = image[0].numpy()
    if mode.startswith("roi"):  # the ROI's voxels, zero elsewhere in its box
        masks = [np.asanyarray(nib.load(str(caps.mask(roi, True))).dataobj) > 0 for roi in ("leftHalf", "rightHalf")]
        truth = truth * np.any(masks, axis=0)
    assert covered.any()
    np.testing.assert_allclose(canvas.result()[covered], truth[covered], rtol=1e-6)
    assert (canvas.result()[~covered] == 0).all()
    if mode == "slice":
        kept = np.zeros(SHAPE[1], bool)
        kept[3:SHAPE[1] - 5] = True
        assert covered[:, kept, :].all() and not covered[:, ~kept, :].any()


def test_overlapping_patch_maps_are_averaged_not_summed(setting):
    store, caps = setting
    spec = part_spec("patch", SHAPE, Extraction(modes=("patch",), patch_size=8, stride_size=5), caps)
    ones, numbered = Canvas(SHAPE), Canvas(SHAPE)
    for part in spec.ids:
        ones.add(*spec.place(part, np.ones((8, 8, 8))))
        numbered.add(*spec.place(part, np.full((8, 8, 8), float(part))))
    assert (ones.result()[ones.covered] == 1).all(), "a map of ones stays one on every covered voxel"
    assert ones.count.max() >= 4, "the test needs overlaps"
    # voxel (6, 6, 6) lies in the patches starting at 0 and 5 along each axis: 8 patches, mean of their numbers
    grid = patch_grid(SHAPE, 8, 5)
    parts = [i * grid[1] * grid[2] + j * grid[2] + k for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    assert numbered.result()[6, 6, 6] == pytest.approx(np.mean(parts))
    reach = [(n - 1) * 5 + 8 for n in grid]  # the remainder no patch reaches stays uncovered
    assert ones.covered.sum() == np.prod(reach) < np.prod(SHAPE)


def test_vote_weights_scale_part_maps_relative_to_an_equal_share():
    assert vote_factors(None) is None
    assert vote_factors({0: 0.8, 1: 0.8}) == {0: 1.0, 1: 1.0}
    factors = vote_factors({0: 0.9, 1: 0.0, 2: 0.6})
    assert factors[1] == 0 and factors[0] == pytest.approx(0.9 / 0.5) and factors[2] == pytest.approx(0.6 / 0.5)
    assert vote_factors({0: 0.0, 1: 0.0}) == {0: 1.0, 1: 1.0}, "no part votes: the ensemble falls back to equal"


@pytest.mark.parametrize("mode", ["image", "patch", "slice", "roi"])
@pytest.mark.parametrize("method", ["gradients", "grad-cam", "integrated-gradients", "occlusion",
                                    RECONSTRUCTION_ERROR])
def test_every_mode_and_method_gives_an_image_sized_map_twice_the_same(mode, method, setting):
    store, caps = setting
    spec = _spec(mode, store, caps)
    dataset = PartDataset(store, spec, [torch.zeros(())], normalize=True)
    in_shape = tuple(dataset[0]["input"].shape)
    torch.manual_seed(0)
    autoencoder = method == RECONSTRUCTION_ERROR
    networks = [None] if mode != "roi" else [0, 1]  # roi: one network per region (multi-network)
    models = [(n, build_network("Conv4_FC3", in_shape, 2, autoencoder=autoencoder).eval(), {}) for n in networks]
    target = None if autoencoder else 1
    first = image_map(models, dataset, 0, method, target, -1, {p: 1.0 for p in spec.ids}, torch.device("cpu"), 4)
    again = image_map(models, dataset, 0, method, target, -1, {p: 1.0 for p in spec.ids}, torch.device("cpu"), 4)
    values = first.result()
    assert values.shape == SHAPE and (values >= 0).all() and values[first.covered].sum() > 0
    np.testing.assert_array_equal(values, again.result())
    assert (values[~first.covered] == 0).all()
    if mode == "roi" and method == "gradients":
        silenced = image_map(models, dataset, 0, method, target, -1, {0: 0.0, 1: 2.0}, torch.device("cpu"), 4)
        left, right_only = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
        left[BOXES["leftHalf"]], right_only[BOXES["rightHalf"]] = True, True
        assert (silenced.result()[left & ~right_only] == 0).all(), "a part that does not vote adds nothing"
        np.testing.assert_allclose(silenced.result()[right_only & ~left], 2 * values[right_only & ~left], rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_a_whole_image_is_what_the_image_mode_network_sees_and_parts_are_cut_from_it(normalize, setting):
    """The reconstruction example (interpret) shows PartDataset.image: the same values as an image-mode item, and
    a patch item is the same cut of it (one normalisation, with the whole image's range, for every mode)."""
    store, caps = setting
    whole = PartDataset(store, _spec("image", store, caps), [torch.zeros(())], normalize=normalize)
    image = whole.image(0)
    assert torch.equal(image, whole[0]["input"])
    low, high = store.range(0)
    assert float(image.min()) == pytest.approx(0.0 if normalize else low)
    assert float(image.max()) == pytest.approx(1.0 if normalize else high)
    patches = PartDataset(store, _spec("patch", store, caps), [torch.zeros(())], normalize=normalize)
    item = patches[3]
    assert torch.equal(item["input"], patches.spec.cut(image, int(item["part"])).float())
