import pytest
import torch
import torchvision

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
