"""The Patch Merger on its own, against vit-pytorch's, and where the ViT merges."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

from backends_tests.helpers import as_numpy, randomize_torch, rel_err
from vitkit.convert.mapping import flatten
from vitkit.models.vit_with_patch_merger import PatchMerger, ViT


@pytest.mark.parametrize("dim, tokens_in, tokens_out", [(12, 7, 3), (10, 4, 9)])
def test_patch_merger_alone_matches_vit_pytorch(dim, tokens_in, tokens_out):
    from vit_pytorch.vit_with_patch_merger import PatchMerger as Reference

    ref = randomize_torch(Reference(dim=dim, num_tokens_out=tokens_out)).eval()
    ours = PatchMerger(dim=dim, num_tokens_out=tokens_out)
    ours.build((None, tokens_in, dim))
    state = ref.state_dict()
    for key, target in flatten(ours.vit_pytorch_state_map()).items():
        target.variable.assign(target.to_keras(state[key].numpy()))
    x = np.random.default_rng(0).normal(size=(2, tokens_in, dim)).astype("float32")
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    got = as_numpy(ours(x))
    assert got.shape == (2, tokens_out, dim)
    assert rel_err(got, expected) < 1e-5


def test_patch_merger_takes_any_number_of_tokens_and_round_trips():
    merger = PatchMerger(dim=8, num_tokens_out=3)
    x = np.random.default_rng(1).normal(size=(2, 11, 8)).astype("float32")
    assert tuple(merger(x).shape) == (2, 3, 8)
    assert tuple(merger(x[:, :5]).shape) == (2, 3, 8)
    clone = PatchMerger.from_config(merger.get_config())
    clone.build((None, 11, 8))
    clone.set_weights(merger.get_weights())
    np.testing.assert_allclose(as_numpy(clone(x)), as_numpy(merger(x)), rtol=1e-6)


def test_patch_merger_names_the_wrong_width():
    with pytest.raises(ValueError, match="`dim` = 8"):
        PatchMerger(dim=8, num_tokens_out=3)(np.zeros((1, 4, 6), "float32"))


@pytest.mark.parametrize("layer, merged_after", [(None, 1), (1, 0), (4, 3)])
def test_the_merge_comes_after_the_named_block(layer, merged_after):
    model = ViT(
        image_size=16,
        patch_size=4,
        num_classes=3,
        dim=8,
        depth=4,
        heads=2,
        dim_head=4,
        mlp_dim=8,
        patch_merge_layer=layer,
        patch_merge_num_tokens=5,
    )
    assert model.transformer.merge_after == merged_after  # None: depth // 2, as the paper
    model.build_default()
    seen = []  # tokens each block's attention is given
    for attention in model.transformer.attentions:

        def spy(x, *args, original=attention.call, **kwargs):
            seen.append(x.shape[1])
            return original(x, *args, **kwargs)

        attention.call = spy
    assert tuple(model(np.zeros((1, 16, 16, 3), "float32")).shape) == (1, 3)
    assert seen == [16] * (merged_after + 1) + [5] * (3 - merged_after)
    keras.utils.clear_session()
