"""Tests of the example models (ViT variants, VGG5) and of the ImageClassifier LightningModule."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.datasets import FakeData
from torchvision.transforms import ToTensor

from example_modules.classifier import ImageClassifier
from example_modules.vgg import VGG5
from example_modules.vit import (
    MODEL_NAMES,
    VIT_PRESETS,
    SelfAttention,
    VisionTransformer,
    build_model,
    expected_parameter_count,
    resolve_patch_size,
)

# (image_size, in_channels): MNIST, CIFAR, scikit-learn digits.
SHAPES = [(28, 1), (32, 3), (8, 1)]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fake_loader(image_size: int, in_channels: int, num_classes: int, size: int = 16) -> DataLoader:
    dataset = FakeData(
        size=size,
        image_size=(in_channels, image_size, image_size),
        num_classes=num_classes,
        transform=ToTensor(),
        random_offset=0,
    )
    return DataLoader(dataset, batch_size=8)


def cpu_trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------- registry


def test_model_names_are_the_papers() -> None:
    assert MODEL_NAMES == ("vit-mlp", "vit-nomlp", "vit-nomlp-wkewq", "vit-nomlp-wkewq-wvwo", "vgg5")


def test_unknown_model_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="vit-nomlp-wkewq-wvwo") as info:
        build_model("vit-tiny", image_size=28, in_channels=1, num_classes=10)
    assert all(name in str(info.value) for name in MODEL_NAMES)


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        build_model("vgg5", image_size=28, in_channels=1, num_classes=10, patch_size=7)
    with pytest.raises(ValueError, match="hidden"):
        build_model("vit-mlp", image_size=28, in_channels=1, num_classes=10, hidden=3)


def test_presets_switch_the_architecture() -> None:
    def attention(name: str) -> SelfAttention:
        model = build_model(name, image_size=28, in_channels=1, num_classes=10)
        return model.blocks[0].attention

    assert build_model("vit-mlp", image_size=28, in_channels=1, num_classes=10).blocks[0].mlp is not None
    assert build_model("vit-nomlp", image_size=28, in_channels=1, num_classes=10).blocks[0].mlp is None
    assert hasattr(attention("vit-nomlp"), "key")
    # W_K = W_Q: there is a single projection, used for both.
    assert not hasattr(attention("vit-nomlp-wkewq"), "key")
    assert hasattr(attention("vit-nomlp-wkewq"), "value")
    assert not hasattr(attention("vit-nomlp-wkewq-wvwo"), "value")
    assert not hasattr(attention("vit-nomlp-wkewq-wvwo"), "output")


def test_default_depth_heads_width() -> None:
    model = build_model("vit-nomlp", image_size=32, in_channels=3, num_classes=10)
    assert len(model.blocks) == 3
    assert model.blocks[0].attention.heads == 4
    assert model.head.in_features == 64
    mlp = build_model("vit-mlp", image_size=32, in_channels=3, num_classes=10).blocks[0].mlp
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features) == (64, 256)


# ---------------------------------------------------------------------------------------------------- patches


@pytest.mark.parametrize(("image_size", "patch_size"), [(28, 7), (32, 4), (8, 2)])
def test_default_patch_sizes(image_size: int, patch_size: int) -> None:
    assert resolve_patch_size(image_size) == patch_size
    model = VisionTransformer(image_size=image_size, in_channels=1, num_classes=10)
    assert model.patch_size == patch_size
    assert model.position_embedding.shape[1] == (image_size // patch_size) ** 2 + 1


def test_patch_size_must_divide_image_size() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        VisionTransformer(image_size=28, in_channels=1, num_classes=10, patch_size=5)
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(image_size=30, in_channels=1, num_classes=10)
    model = VisionTransformer(image_size=30, in_channels=1, num_classes=10, patch_size=5)
    assert model(torch.randn(2, 1, 30, 30)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("image_size", "in_channels"), SHAPES)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_parameter_count_matches_formula(name: str, image_size: int, in_channels: int, num_classes: int) -> None:
    model = build_model(name, image_size=image_size, in_channels=in_channels, num_classes=num_classes)
    expected = expected_parameter_count(name, image_size=image_size, in_channels=in_channels, num_classes=num_classes)
    assert count_parameters(model) == expected


@pytest.mark.parametrize(
    "overrides",
    [
        {"similarity": "collapsed"},
        {"similarity": "collapsed-symmetric"},
        {"similarity": "collapsed-symmetric", "value_output": False, "mlp": True},
        {"similarity": "asymmetric", "value_output": False},
        {"pool": "mean", "width": 48, "heads": 3, "depth": 2},
        {"patch_size": 14, "heads": 1},
    ],
)
def test_parameter_count_matches_formula_for_other_switches(overrides: dict) -> None:
    for image_size, in_channels in [(28, 1)]:
        model = build_model("vit-nomlp", image_size=image_size, in_channels=in_channels, num_classes=10, **overrides)
        expected = expected_parameter_count(
            "vit-nomlp", image_size=image_size, in_channels=in_channels, num_classes=10, **overrides
        )
        assert count_parameters(model) == expected


def test_parameter_counts_of_the_papers_models() -> None:
    """Spot values (also reported in the docs), so a formula and a model cannot drift apart together."""
    counts = {
        name: expected_parameter_count(name, image_size=28, in_channels=1, num_classes=10) for name in MODEL_NAMES
    }
    assert counts == {
        "vit-mlp": 155082,
        "vit-nomlp": 55434,
        "vit-nomlp-wkewq": 42954,
        "vit-nomlp-wkewq-wvwo": 17994,
        "vgg5": 226570,
    }


def test_collapsed_symmetric_has_triangular_parameter_count() -> None:
    attention = SelfAttention(width=8, heads=2, similarity="collapsed-symmetric", value_output=False)
    assert count_parameters(attention) == 2 * 8 * 9 // 2
    factor = attention.triangular_factor()
    assert torch.equal(factor, factor.tril())


# ---------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("similarity", ["symmetric", "collapsed-symmetric"])
def test_symmetric_similarities_are_symmetric(similarity: str) -> None:
    torch.manual_seed(0)
    attention = SelfAttention(width=64, heads=4, similarity=similarity)
    scores = attention.similarity(torch.randn(3, 17, 64))
    assert scores.shape == (3, 4, 17, 17)
    torch.testing.assert_close(scores, scores.transpose(-2, -1))
    # For W_QK = T T^T (and W_K = W_Q) the score matrix is a Gram matrix: positive semi-definite.
    assert torch.linalg.eigvalsh(scores.double()).min() > -1e-4


@pytest.mark.parametrize("similarity", ["asymmetric", "collapsed"])
def test_general_similarities_are_not_symmetric(similarity: str) -> None:
    torch.manual_seed(0)
    attention = SelfAttention(width=64, heads=4, similarity=similarity)
    scores = attention.similarity(torch.randn(3, 17, 64))
    assert (scores - scores.transpose(-2, -1)).abs().max() > 1e-3


def test_wkewq_preset_has_symmetric_similarity_in_every_block() -> None:
    torch.manual_seed(0)
    model = build_model("vit-nomlp-wkewq", image_size=32, in_channels=3, num_classes=10)
    tokens = torch.randn(2, 65, 64)
    for block in model.blocks:
        scores = block.attention.similarity(block.attention_norm(tokens))
        torch.testing.assert_close(scores, scores.transpose(-2, -1))


@pytest.mark.parametrize("similarity", ["asymmetric", "symmetric", "collapsed", "collapsed-symmetric"])
@pytest.mark.parametrize("value_output", [True, False])
def test_forward_equals_softmax_of_similarity(similarity: str, value_output: bool) -> None:
    torch.manual_seed(0)
    attention = SelfAttention(width=16, heads=4, similarity=similarity, value_output=value_output)
    x = torch.randn(2, 5, 16)
    weights = attention.attention_weights(x)
    values = attention.value(x) if value_output else x
    heads = [weights[:, h] @ values[..., 4 * h : 4 * h + 4] for h in range(4)]
    expected = torch.cat(heads, dim=-1)
    if value_output:
        expected = attention.output(expected)
    torch.testing.assert_close(attention(x), expected)


@pytest.mark.parametrize("similarity", ["symmetric", "asymmetric"])
def test_without_value_and_output_each_head_slice_is_a_convex_combination(similarity: str) -> None:
    torch.manual_seed(0)
    heads, width = 4, 64
    attention = SelfAttention(width=width, heads=heads, similarity=similarity, value_output=False)
    x = torch.randn(3, 17, width)
    out = attention(x)
    weights = attention.attention_weights(x)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, heads, 17))
    d = width // heads
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        torch.testing.assert_close(out[..., part], weights[:, h] @ x[..., part])
        # Inside the convex hull of the input slices, so inside their bounding box, coordinate by coordinate.
        low = x[..., part].amin(dim=1, keepdim=True)
        high = x[..., part].amax(dim=1, keepdim=True)
        assert (out[..., part] >= low - 1e-5).all()
        assert (out[..., part] <= high + 1e-5).all()


def test_with_value_and_output_the_output_leaves_the_hull() -> None:
    """The check above can fail: with W_V and W_O the outputs are not confined to the inputs' bounding box."""
    torch.manual_seed(0)
    attention = SelfAttention(width=64, heads=4, similarity="symmetric", value_output=True)
    with torch.no_grad():
        attention.output.weight.mul_(10.0)
    x = torch.randn(3, 17, 64)
    out = attention(x)
    assert ((out > x.amax(dim=1, keepdim=True)) | (out < x.amin(dim=1, keepdim=True))).any()


def test_wvwo_preset_attention_has_no_parameters_but_the_shared_projection() -> None:
    model = build_model("vit-nomlp-wkewq-wvwo", image_size=28, in_channels=1, num_classes=10)
    names = {name for name, _ in model.blocks[0].attention.named_parameters()}
    assert names == {"query.weight", "query.bias"}


# ---------------------------------------------------------------------------------------------------- VGG5


@pytest.mark.parametrize(("image_size", "in_channels"), SHAPES)
def test_vgg5_has_five_weight_layers(image_size: int, in_channels: int) -> None:
    model = build_model("vgg5", image_size=image_size, in_channels=in_channels, num_classes=10)
    assert isinstance(model, VGG5)
    weight_layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weight_layers) == 5
    assert [type(m) for m in weight_layers] == [nn.Conv2d] * 3 + [nn.Linear] * 2
    assert all(m.kernel_size == (3, 3) for m in weight_layers[:3])
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    # Every parameter belongs to a weight layer.
    assert sum(count_parameters(m) for m in weight_layers) == count_parameters(model)
    assert model(torch.randn(2, in_channels, image_size, image_size)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("image_size", "in_channels"), SHAPES)
def test_every_model_trains_one_step(name: str, image_size: int, in_channels: int) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(model=name, num_classes=10, image_size=image_size, in_channels=in_channels)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = cpu_trainer(fast_dev_run=1)
    loader = fake_loader(image_size, in_channels, 10)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    loss = trainer.callback_metrics["train_loss"]
    assert torch.isfinite(loss)
    assert 0 < loss <= 2 / 10  # the MSE between probabilities and one-hot targets is at most 2/K
    assert {"train_acc", "val_loss", "val_acc"} <= set(trainer.callback_metrics)
    assert "val_acc_top5" not in trainer.callback_metrics
    changed = [not torch.equal(b, p) for b, p in zip(before, module.parameters())]
    assert all(changed), "Adam should move every parameter after one step"


def test_top5_accuracy_is_logged_for_many_classes() -> None:
    torch.manual_seed(0)
    module = ImageClassifier(model="vit-nomlp", num_classes=100, image_size=32, in_channels=3)
    loader = fake_loader(32, 3, 100)
    trainer = cpu_trainer(fast_dev_run=1)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    metrics = trainer.callback_metrics
    assert metrics["val_acc_top5"] >= metrics["val_acc"]
    assert not hasattr(ImageClassifier(num_classes=10), "val_acc_top5")


def test_mse_loss_is_the_papers() -> None:
    torch.manual_seed(0)
    module = ImageClassifier(model="vit-nomlp", loss="mse")
    logits = torch.randn(6, 10)
    labels = torch.tensor([0, 1, 2, 3, 4, 9])
    probabilities = logits.softmax(-1)
    expected = ((probabilities - F.one_hot(labels, 10).float()) ** 2).sum() / (6 * 10)
    torch.testing.assert_close(module.compute_loss(logits, labels), expected)
    module = ImageClassifier(model="vit-nomlp", loss="cross_entropy")
    torch.testing.assert_close(module.compute_loss(logits, labels), F.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="loss"):
        ImageClassifier(loss="hinge")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_is_repeatable() -> None:
    """The CG phase re-evaluates training_step: the same batch must give the same loss (no dropout)."""
    torch.manual_seed(0)
    module = ImageClassifier(model="vit-mlp")
    batch = (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    first = module.training_step(batch, 0)
    second = module.training_step(batch, 0)
    assert torch.equal(first, second)


def test_overrides_and_optimizer() -> None:
    module = ImageClassifier(
        model="vit-nomlp", image_size=32, in_channels=3, patch_size=8, width=32, depth=2, heads=2, lr=0.01
    )
    assert module.model.patch_size == 8
    assert len(module.model.blocks) == 2
    assert module.model.head.in_features == 32
    assert module.hparams.lr == 0.01 and module.hparams.model == "vit-nomlp"
    optimizer = module.configure_optimizers()
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(module.parameters()))
    vgg = ImageClassifier(model="vgg5", width=8)
    assert vgg.model.features[0].out_channels == 8
    collapsed = ImageClassifier(model="vit-nomlp", similarity="collapsed-symmetric")
    assert collapsed.model.blocks[0].attention.similarity_kind == "collapsed-symmetric"


def test_presets_table_is_consistent() -> None:
    assert set(VIT_PRESETS) == set(MODEL_NAMES) - {"vgg5"}
