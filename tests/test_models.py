import pytest
import torch

from pipeline.models import build_model, count_parameters, discover


@pytest.mark.parametrize("name", sorted(discover()))
@pytest.mark.parametrize("num_classes", [2, 4])
def test_every_model_forward_and_backward(name, num_classes):
    torch.manual_seed(0)
    net = build_model(name, num_classes)
    images = torch.rand(3, 3, 32, 32)
    logits = net(images)
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    print(f"{name}: {count_parameters(net):,} parameters")


def test_lenet_is_the_classic_stack():
    net = build_model("lenet", 4)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert [lin.out_features for lin in linears] == [120, 84, 4]


def test_model_variants_build():
    assert count_parameters(build_model("resnet", 4, depth=20, width=4)) > 4 * count_parameters(build_model("resnet", 4))
    assert build_model("vgg", 4, cfg="vgg8")(torch.rand(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [("alexnet", {}, "Unknown model 'alexnet'"), ("resnet", {"depth": 18}, r"6n\+2.*got 18"),
     ("vgg", {"cfg": "huge"}, "Unknown VGG cfg")],
)
def test_bad_model_arguments_name_the_value(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(name, 4, **kwargs)
