"""VGG5 ("vgg5-max-relu"): the convolutional baseline of Hrycej et al. (KDIR 2025).

The paper gives only "five weight layers, max pooling, ReLU". The widths here are this package's choice:

====================  =====================================================
layer                 shape
====================  =====================================================
conv 3x3, ReLU        ``in_channels -> width`` (32), padding 1
max pool 2x2
conv 3x3, ReLU        ``width -> 2 * width`` (64), padding 1
max pool 2x2
conv 3x3, ReLU        ``2 * width -> 4 * width`` (128), padding 1
adaptive max pool     to 2x2, whatever the input size
linear, ReLU          ``4 * width * 2 * 2 -> hidden`` (512 -> 256)
linear                ``hidden -> num_classes``
====================  =====================================================

The adaptive pooling makes the same network work for 28x28 (7x7 maps before it), 32x32 (8x8) and 8x8 (2x2) inputs,
with a parameter count that does not depend on the image size. No batch normalisation, no dropout.
"""

from __future__ import annotations

from torch import Tensor, nn

# Side of the feature map the classifier sees, for every input size.
POOLED_SIZE = 2


class VGG5(nn.Module):
    """A VGG-style network with exactly five weight layers: three 3x3 convolutions and two linear layers.

    Args:
        image_size: side of the square input images (at least 4, so that both 2x2 poolings keep a pixel).
        in_channels: number of input channels.
        num_classes: number of output logits.
        width: channels of the first convolution; the next two have ``2 * width`` and ``4 * width``.
        hidden: width of the hidden linear layer.

    """

    def __init__(self, image_size: int, in_channels: int, num_classes: int, width: int = 32, hidden: int = 256) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"VGG5 needs images of at least 4x4 pixels (two 2x2 poolings), got {image_size}.")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(POOLED_SIZE),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * width * POOLED_SIZE**2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, images: Tensor) -> Tensor:
        """Logits of shape ``(batch, num_classes)`` for images of shape ``(batch, in_channels, H, W)``."""
        return self.classifier(self.features(images))


def vgg5_parameter_count(
    image_size: int, in_channels: int, num_classes: int, width: int = 32, hidden: int = 256
) -> int:
    """The number of parameters of :class:`VGG5` with these arguments (weights and biases of its five layers).

    Args:
        image_size: side of the input images (the count does not depend on it).
        in_channels: number of input channels ``C``.
        num_classes: number of classes ``K``.
        width: channels of the first convolution ``w``.
        hidden: width of the hidden linear layer ``H``.

    """
    del image_size  # the adaptive pooling makes the count independent of the image size
    convs = (
        (9 * in_channels * width + width)
        + (9 * width * 2 * width + 2 * width)
        + (9 * 2 * width * 4 * width + 4 * width)
    )
    linears = (4 * width * POOLED_SIZE**2 * hidden + hidden) + (hidden * num_classes + num_classes)
    return convs + linears
