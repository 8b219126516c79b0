"""The Vision Transformer family of Bermeitinger et al. (KDIR 2024) and the model registry of the examples.

One class, :class:`VisionTransformer`, covers every variant of the two papers through switches:

- ``mlp``: the encoder's MLP block (``width -> 4 * width -> width`` with GELU) on or off.
- ``similarity``: how the pre-softmax similarity of token ``i`` to token ``j`` is formed, per head ``h``:

  - ``"asymmetric"``: ``q_i . k_j / sqrt(d)`` with separate ``W_Q`` and ``W_K`` (the standard transformer);
  - ``"symmetric"``: ``W_K = W_Q`` (one projection, bias included), so the similarity is symmetric in ``i, j``;
  - ``"collapsed"``: one bilinear form ``x_i^T W_QK^h x_j / sqrt(d)`` with a full ``width x width`` matrix per head
    (the product ``W_Q^h W_K^hT`` collapsed into one matrix, no bias);
  - ``"collapsed-symmetric"``: as ``"collapsed"`` with ``W_QK^h = T_h T_h^T``, ``T_h`` lower triangular and stored
    packed (``width * (width + 1) / 2`` parameters per head), so the form is symmetric and positive semi-definite.

  Here ``d = width / heads`` is the head width.
- ``value_output``: value and output projections present, or omitted (``W_V = W_O =`` identity). Without them the
  embedding is split into ``heads`` consecutive slices of ``d`` features; head ``h`` mixes slice ``h`` of the
  sublayer's input tokens with its softmax weights, and the slices are concatenated. Each slice of the output is thus
  a convex combination of the same slice of the input embeddings. The similarity still sees the whole embedding.

The remaining choices: non-overlapping patches embedded by a strided convolution (a linear map of each flattened
patch, with bias), a learned class token (``pool="cls"``, default) or the mean over the patch tokens
(``pool="mean"``), learned position embeddings, pre-LayerNorm encoder blocks
(``x + attn(LN(x))`` then ``x + mlp(LN(x))``), a final LayerNorm, and a linear head to ``num_classes`` logits. No
dropout: the conjugate-gradient phase needs a deterministic training loss.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from example_modules.vgg import VGG5, vgg5_parameter_count

SIMILARITIES = ("asymmetric", "symmetric", "collapsed", "collapsed-symmetric")
POOLINGS = ("cls", "mean")

# Default patch sizes: 4x4 patches of 7x7 for MNIST, 8x8 patches of 4x4 for CIFAR, 4x4 patches of 2x2 for digits.
DEFAULT_PATCH_SIZES = {28: 7, 32: 4, 8: 2}

#: The papers' ViT variants as keyword arguments of :class:`VisionTransformer`.
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit-mlp": {"mlp": True, "similarity": "asymmetric", "value_output": True},
    "vit-nomlp": {"mlp": False, "similarity": "asymmetric", "value_output": True},
    "vit-nomlp-wkewq": {"mlp": False, "similarity": "symmetric", "value_output": True},
    "vit-nomlp-wkewq-wvwo": {"mlp": False, "similarity": "symmetric", "value_output": False},
}

#: Every name :func:`build_model` knows.
MODEL_NAMES: tuple[str, ...] = (*VIT_PRESETS, "vgg5")


def resolve_patch_size(image_size: int, patch_size: int | None = None) -> int:
    """The patch size to use for square images of side ``image_size``.

    Args:
        image_size: side of the (square) input images in pixels.
        patch_size: an explicit patch size, or ``None`` for the default of the image size (7 for 28, 4 for 32,
            2 for 8).

    Raises:
        ValueError: if there is no default for ``image_size`` or the image size is not divisible by the patch size.

    """
    if patch_size is None:
        if image_size not in DEFAULT_PATCH_SIZES:
            raise ValueError(
                f"There is no default patch size for {image_size}x{image_size} images (defaults exist for sizes "
                f"{sorted(DEFAULT_PATCH_SIZES)}); pass patch_size explicitly."
            )
        patch_size = DEFAULT_PATCH_SIZES[image_size]
    if patch_size < 1 or image_size % patch_size != 0:
        raise ValueError(
            f"The image size {image_size} is not divisible by the patch size {patch_size}: patches must tile the "
            "image exactly. Choose a patch size that divides the image size."
        )
    return patch_size


class SelfAttention(nn.Module):
    """Multi-head self-attention with a configurable similarity and optional value/output projections.

    Args:
        width: embedding width ``N``.
        heads: number of heads; must divide ``width``. The head width is ``d = width // heads``.
        similarity: one of ``"asymmetric"``, ``"symmetric"``, ``"collapsed"``, ``"collapsed-symmetric"`` (see the
            module docstring).
        value_output: whether the value and output projections exist; without them head ``h`` returns a convex
            combination of slice ``h`` (features ``h*d`` to ``(h+1)*d``) of the input tokens.

    """

    def __init__(self, width: int, heads: int, similarity: str = "asymmetric", value_output: bool = True) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"Unknown similarity {similarity!r}; choose one of {SIMILARITIES}.")
        if heads < 1 or width % heads != 0:
            raise ValueError(f"The embedding width {width} must be a positive multiple of the number of heads {heads}.")
        self.width = width
        self.heads = heads
        self.head_width = width // heads
        self.similarity_kind = similarity
        self.value_output = value_output
        self.scale = self.head_width**-0.5

        if similarity == "asymmetric":
            self.query = nn.Linear(width, width)
            self.key = nn.Linear(width, width)
        elif similarity == "symmetric":
            # W_K = W_Q: one module serves both, so they are the same matrix (and bias) by construction.
            self.query = nn.Linear(width, width)
        elif similarity == "collapsed":
            # Scale of the product of two default-initialised projections W_Q^h W_K^hT (entries of variance 1/(3N)).
            std = math.sqrt(self.head_width) / (3 * width)
            self.qk = nn.Parameter(torch.randn(heads, width, width) * std)
        else:
            # Packed lower triangle of T_h; the scale matches the mean diagonal of W_Q^h W_Q^hT.
            std = math.sqrt(2 * self.head_width / 3) / width
            self.qk_tril = nn.Parameter(torch.randn(heads, width * (width + 1) // 2) * std)
            self.register_buffer("tril_index", torch.tril_indices(width, width), persistent=False)

        if value_output:
            self.value = nn.Linear(width, width)
            self.output = nn.Linear(width, width)

    def triangular_factor(self) -> Tensor:
        """The lower-triangular factors ``T_h`` of shape ``(heads, width, width)`` (``"collapsed-symmetric"`` only)."""
        factor = self.qk_tril.new_zeros(self.heads, self.width, self.width)
        factor[:, self.tril_index[0], self.tril_index[1]] = self.qk_tril
        return factor

    def _split_heads(self, x: Tensor) -> Tensor:
        """``(batch, tokens, width)`` to ``(batch, heads, tokens, head_width)``."""
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.heads, self.head_width).transpose(1, 2)

    def queries_and_keys(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys of shape ``(batch, heads, tokens, e)`` whose scaled dot products are the similarity.

        ``e`` is the head width for the projected similarities and the full width for the collapsed ones
        (``x W_QK^h`` against ``x``, or ``x T_h`` against itself).
        """
        kind = self.similarity_kind
        if kind == "asymmetric":
            return self._split_heads(self.query(x)), self._split_heads(self.key(x))
        if kind == "symmetric":
            query = self._split_heads(self.query(x))
            return query, query
        if kind == "collapsed":
            query = torch.einsum("btn,hnm->bhtm", x, self.qk)
            return query, x.unsqueeze(1).expand_as(query)
        query = torch.einsum("btn,hnm->bhtm", x, self.triangular_factor())
        return query, query

    def similarity(self, x: Tensor) -> Tensor:
        """The pre-softmax similarity scores of shape ``(batch, heads, tokens, tokens)``.

        Args:
            x: tokens of shape ``(batch, tokens, width)`` (the sublayer's input, after the LayerNorm).

        """
        query, key = self.queries_and_keys(x)
        return query @ key.transpose(-2, -1) * self.scale

    def attention_weights(self, x: Tensor) -> Tensor:
        """The softmax of :meth:`similarity` over the keys: non-negative rows that sum to one."""
        return self.similarity(x).softmax(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the tokens ``x`` of shape ``(batch, tokens, width)``; the output has the same shape."""
        query, key = self.queries_and_keys(x)
        values = self._split_heads(self.value(x) if self.value_output else x)
        # The fused kernel computes softmax(similarity) @ values without materialising the scores on GPUs.
        mixed = F.scaled_dot_product_attention(query, key, values, scale=self.scale)
        mixed = mixed.transpose(1, 2).reshape(x.shape)
        return self.output(mixed) if self.value_output else mixed


class EncoderBlock(nn.Module):
    """A pre-LayerNorm encoder block: ``x + attn(LN(x))``, then ``x + mlp(LN(x))`` when the MLP is on.

    Args:
        width: embedding width.
        heads: number of attention heads.
        mlp: whether the block has the MLP sublayer (``width -> 4 * width -> width`` with GELU).
        similarity: the attention's similarity (see :class:`SelfAttention`).
        value_output: whether the attention has value and output projections.

    """

    def __init__(self, width: int, heads: int, mlp: bool, similarity: str, value_output: bool) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, similarity=similarity, value_output=value_output)
        self.mlp: nn.Module | None = None
        if mlp:
            self.mlp_norm = nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to tokens of shape ``(batch, tokens, width)``."""
        x = x + self.attention(self.attention_norm(x))
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


class VisionTransformer(nn.Module):
    """A small Vision Transformer whose switches give every variant of Bermeitinger et al. (2024).

    Args:
        image_size: side of the square input images in pixels.
        in_channels: number of input channels.
        num_classes: number of output logits.
        patch_size: side of the square patches; ``None`` picks 7 for 28x28, 4 for 32x32 and 2 for 8x8 images.
        width: embedding width.
        depth: number of encoder blocks.
        heads: number of attention heads; must divide ``width``.
        mlp: whether the encoder blocks have an MLP sublayer.
        similarity: ``"asymmetric"``, ``"symmetric"`` (``W_K = W_Q``), ``"collapsed"`` (one ``W_QK`` per head) or
            ``"collapsed-symmetric"`` (``W_QK = T T^T``, ``T`` lower triangular).
        value_output: whether the attention has value and output projections.
        pool: ``"cls"`` classifies from a learned class token, ``"mean"`` from the mean of the patch tokens.

    Raises:
        ValueError: for an image size not divisible by the patch size, or an unknown ``similarity`` or ``pool``.

    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        num_classes: int,
        patch_size: int | None = None,
        width: int = 64,
        depth: int = 3,
        heads: int = 4,
        mlp: bool = True,
        similarity: str = "asymmetric",
        value_output: bool = True,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        if pool not in POOLINGS:
            raise ValueError(f"Unknown pool {pool!r}; choose one of {POOLINGS}.")
        self.patch_size = resolve_patch_size(image_size, patch_size)
        self.pool = pool
        num_patches = (image_size // self.patch_size) ** 2
        num_tokens = num_patches + (1 if pool == "cls" else 0)

        self.patch_embedding = nn.Conv2d(in_channels, width, kernel_size=self.patch_size, stride=self.patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.position_embedding = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        self.blocks = nn.ModuleList(
            EncoderBlock(width, heads, mlp=mlp, similarity=similarity, value_output=value_output) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """Logits of shape ``(batch, num_classes)`` for images of shape ``(batch, in_channels, H, W)``."""
        x = self.patch_embedding(images).flatten(2).transpose(1, 2)
        if self.class_token is not None:
            x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.class_token is not None else x.mean(dim=1)
        return self.head(pooled)


def vit_parameter_count(
    image_size: int,
    in_channels: int,
    num_classes: int,
    patch_size: int | None = None,
    width: int = 64,
    depth: int = 3,
    heads: int = 4,
    mlp: bool = True,
    similarity: str = "asymmetric",
    value_output: bool = True,
    pool: str = "cls",
) -> int:
    """The number of parameters of :class:`VisionTransformer` with these arguments, from the architecture.

    With ``N = width``, ``p`` the patch size, ``T`` the number of tokens (patches, plus one for the class token):
    patch embedding ``C p^2 N + N``; class token ``N``; positions ``T N``; per block a LayerNorm ``2N``, the
    similarity (``asymmetric`` ``2(N^2 + N)``, ``symmetric`` ``N^2 + N``, ``collapsed`` ``heads N^2``,
    ``collapsed-symmetric`` ``heads N (N + 1) / 2``), value and output ``2(N^2 + N)``, MLP with its LayerNorm
    ``2N + (4N^2 + 4N) + (4N^2 + N)``; final LayerNorm ``2N``; head ``N K + K``.

    Args:
        image_size: side of the square input images.
        in_channels: number of input channels ``C``.
        num_classes: number of classes ``K``.
        patch_size: as for :class:`VisionTransformer`.
        width: embedding width ``N``.
        depth: number of encoder blocks.
        heads: number of heads.
        mlp: whether the blocks have an MLP.
        similarity: the similarity kind.
        value_output: whether value and output projections exist.
        pool: ``"cls"`` or ``"mean"``.

    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"Unknown similarity {similarity!r}; choose one of {SIMILARITIES}.")
    if pool not in POOLINGS:
        raise ValueError(f"Unknown pool {pool!r}; choose one of {POOLINGS}.")
    n = width
    p = resolve_patch_size(image_size, patch_size)
    has_cls = pool == "cls"
    tokens = (image_size // p) ** 2 + int(has_cls)
    similarity_params = {
        "asymmetric": 2 * (n * n + n),
        "symmetric": n * n + n,
        "collapsed": heads * n * n,
        "collapsed-symmetric": heads * n * (n + 1) // 2,
    }[similarity]
    block = 2 * n + similarity_params
    if value_output:
        block += 2 * (n * n + n)
    if mlp:
        block += 2 * n + (n * 4 * n + 4 * n) + (4 * n * n + n)
    embedding = in_channels * p * p * n + n + n * int(has_cls) + tokens * n
    return embedding + depth * block + 2 * n + n * num_classes + num_classes


def _check_overrides(name: str, target: Any, overrides: dict[str, Any]) -> None:
    """Reject overrides that ``target`` does not take, naming the ones it does."""
    fixed = {"self", "image_size", "in_channels", "num_classes"}
    accepted = [p for p in inspect.signature(target).parameters if p not in fixed]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"Model {name!r} does not take {unknown}; its options are {accepted}.")


def _model_spec(name: str, overrides: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """The constructor, the parameter-count formula and the keyword arguments for a model name."""
    if name == "vgg5":
        _check_overrides(name, VGG5, overrides)
        return VGG5, vgg5_parameter_count, dict(overrides)
    if name in VIT_PRESETS:
        _check_overrides(name, VisionTransformer, overrides)
        return VisionTransformer, vit_parameter_count, {**VIT_PRESETS[name], **overrides}
    raise ValueError(f"Unknown model {name!r}; valid names are {', '.join(MODEL_NAMES)}.")


def build_model(name: str, *, image_size: int, in_channels: int, num_classes: int, **overrides: Any) -> nn.Module:
    """Build one of the papers' models by name.

    Args:
        name: one of :data:`MODEL_NAMES` (``vit-mlp``, ``vit-nomlp``, ``vit-nomlp-wkewq``, ``vit-nomlp-wkewq-wvwo``,
            ``vgg5``).
        image_size: side of the square input images.
        in_channels: number of input channels.
        num_classes: number of classes.
        **overrides: constructor arguments that replace the preset's (e.g. ``patch_size``, ``width``, ``depth``,
            ``heads``, ``similarity`` for the ViTs; ``width``, ``hidden`` for ``vgg5``).

    Raises:
        ValueError: for an unknown name or an option the model does not take.

    """
    cls, _, kwargs = _model_spec(name, overrides)
    return cls(image_size=image_size, in_channels=in_channels, num_classes=num_classes, **kwargs)


def expected_parameter_count(
    name: str, *, image_size: int, in_channels: int, num_classes: int, **overrides: Any
) -> int:
    """The number of parameters :func:`build_model` gives for these arguments, from each architecture's formula.

    Args:
        name: one of :data:`MODEL_NAMES`.
        image_size: side of the square input images.
        in_channels: number of input channels.
        num_classes: number of classes.
        **overrides: as for :func:`build_model`.

    """
    _, formula, kwargs = _model_spec(name, overrides)
    return formula(image_size=image_size, in_channels=in_channels, num_classes=num_classes, **kwargs)
