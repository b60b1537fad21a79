import pytest
import torch
import torchvision

from train.archs import classification_builders
from train.errors import UsageError
from train.models import build_model, replace_head


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18",
                                  "efficientnet_b0"])
def test_head_sized_to_the_classes(arch):
    model = build_model(arch, 7).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_arch_lists_close_matches():
    with pytest.raises(UsageError, match="did you mean mobilenet_v3_small"):
        build_model("mobilenet_v3_smal", 10)


def test_the_arch_list_read_from_torchvisions_source_is_its_list_models():
    """train/archs.py answers --arch without importing torchvision, from the builders its source registers."""
    assert list(classification_builders()) == sorted(torchvision.models.list_models(module=torchvision.models))


def test_pretrained_weights_come_from_torch_hub_cache(tmp_path, monkeypatch):
    """The --pretrained path without network: put 'ImageNet' weights where torchvision caches them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    fake = torchvision.models.resnet18()  # 1000 classes, random: stands in for the downloaded file
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(fake.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    model = build_model("resnet18", 10, pretrained=True)
    assert torch.equal(model.conv1.weight, fake.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, fake.layer4[1].bn2.running_var)
    assert model.fc.out_features == 10


def test_replace_head_finds_the_last_linear_layer():
    model = replace_head(torchvision.models.mobilenet_v3_small(), 3)
    assert model.classifier[3].out_features == 3 and model.classifier[0].out_features == 1024


def _final_map(model, arch):
    features = model.features if hasattr(model, "features") else torch.nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4)
    return features.eval()(torch.zeros(1, 3, 32, 32)).shape[-2:]


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18"])
def test_cifar_stem_keeps_4x4_of_a_32px_image(arch):
    assert _final_map(build_model(arch, 10), arch) == (1, 1)  # what ImageNet strides leave
    model = build_model(arch, 10, cifar_stem=True)
    assert _final_map(model, arch) == (4, 4)
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cifar_stem_keeps_pretrained_weights_where_shapes_allow(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.MobileNet_V2_Weights.DEFAULT.url
    fake = torchvision.models.mobilenet_v2()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(fake.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
    model = build_model("mobilenet_v2", 10, pretrained=True, cifar_stem=True)
    assert model.features[0][0].stride == (1, 1) and torch.equal(model.features[0][0].weight,
                                                                 fake.features[0][0].weight)
    assert model.features[2].conv[1][0].stride == (1, 1)


def test_cifar_stem_refuses_other_architectures():
    with pytest.raises(UsageError, match="--cifar-stem supports"):
        build_model("efficientnet_b0", 10, cifar_stem=True)
