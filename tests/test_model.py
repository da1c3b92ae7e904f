"""The model loads the packaged ImageNet weights correctly and is versioned by what shapes its vectors."""
from __future__ import annotations

import copy
import re
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.embed.embedder import decode_for_model
from pipelines.embed.model import (ARCHITECTURE, PcaProjection, Preprocessing, WeightsError, choose_device, classify,
                             default_spec, fold_batchnorm, load_classifier, map_packaged_state_dict,
                             model_version, packaged_weights_path)

CAT_PHOTO = Path(__file__).parent / "data" / "chelsea.png"  # scikit-image's data.chelsea()
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def spec():
    return default_spec()


@pytest.fixture(scope="module")
def classifier(spec):
    return load_classifier(spec)


def test_cat_photo_classifies_as_a_cat(spec, classifier):
    pixels = decode_for_model(CAT_PHOTO.read_bytes(), spec.preprocessing)
    [top5] = classify(classifier, pixels[None], spec.preprocessing)
    assert top5[0][0] in IMAGENET_CATS, top5
    # not a lucky top-1: the cat classes together hold most of the probability
    assert sum(p for index, _, p in top5 if index in IMAGENET_CATS) > 0.7, top5


def test_every_packaged_weight_lands_on_a_tensor_of_the_same_shape():
    import timm

    packaged = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(ARCHITECTURE, pretrained=False).state_dict()
    mapped = map_packaged_state_dict(packaged, target)
    assert list(mapped) == list(target)
    assert all(mapped[name].shape == target[name].shape for name in target)
    assert len(mapped) == len(packaged) == 296


def test_a_checkpoint_that_does_not_fit_is_refused_by_name():
    target = OrderedDict(conv_stem=torch.zeros(32, 3, 3, 3), bn1=torch.zeros(32))
    wrong_shape = OrderedDict(_conv_stem=torch.zeros(32, 3, 3, 3), _bn0=torch.zeros(16))
    with pytest.raises(WeightsError, match=r"_bn0 has shape \(16,\).*bn1 needs \(32,\)"):
        map_packaged_state_dict(wrong_shape, target)
    with pytest.raises(WeightsError, match="1 tensors"):
        map_packaged_state_dict(OrderedDict(_conv_stem=torch.zeros(32, 3, 3, 3)), target)


def test_weights_that_differ_from_the_spec_are_refused(spec):
    with pytest.raises(WeightsError, match="sha256"):
        load_classifier(replace(spec, weights_sha256="0" * 64))


def test_folding_batchnorm_keeps_the_outputs(classifier):
    folded = fold_batchnorm(copy.deepcopy(classifier))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(folded(images), classifier(images), atol=1e-3, rtol=1e-4)


def test_model_version_names_everything_that_changes_a_vector(spec):
    version = model_version(spec)
    assert re.fullmatch(r"effnetlite0-[0-9a-f]{12}", version)
    assert model_version(default_spec()) == version  # stable across processes: no ids, no floats' repr drift
    pca = PcaProjection(mean=np.zeros(1280, np.float32), components=np.eye(64, 1280, dtype=np.float32))
    variants = [
        replace(spec, pooling="avg"),
        replace(spec, gem_p=4.0),
        replace(spec, preprocessing=Preprocessing(resize_shorter=240)),
        replace(spec, weights_sha256="f" * 64),
        replace(spec, pca=pca),
    ]
    versions = {model_version(variant) for variant in variants}
    assert version not in versions and len(versions) == len(variants)
    assert replace(spec, pca=pca).output_dim == 64


class FakeResource:
    """Anything with `.addresses`, like pyspark's ResourceInformation."""
    def __init__(self, *addresses: str):
        self.addresses = list(addresses)


def test_cpu_machine_falls_back_to_cpu_even_when_a_gpu_was_assigned(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device({"gpu": FakeResource("0")}) == torch.device("cpu")
    assert choose_device(None) == torch.device("cpu")


def test_the_gpu_spark_assigned_to_the_task_is_used(monkeypatch):
    from pyspark.resource import ResourceInformation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert choose_device({"gpu": ResourceInformation("gpu", ["1"])}) == torch.device("cuda:1")
    assert choose_device({"gpu": FakeResource("3", "2")}) == torch.device("cuda:3")
    # a task scheduled without a GPU must not grab one that belongs to another task
    assert choose_device({}) == torch.device("cpu")
    assert choose_device(None) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="address 7"):
        choose_device({"gpu": FakeResource("7")})
