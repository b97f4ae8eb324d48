"""Spatial sizes of the VAE's fields, and the periodic padding that lets strided convolutions take any size.

A stack of ``k`` stride-2 convolutions maps a field to ``1 / 2**k`` of its size only when every
axis is divisible by ``2**k``. Microstructures are periodic, so a field of any other size loses
nothing when it is extended periodically (wrapped around) to the next multiple of ``2**k``: the
encoder sees a few rows of the field's other side again, and the decoder draws the larger field,
whose first ``N`` entries along each axis are the output. Sizes that are already multiples go
through untouched, so their architectures are those of a model without padding.

Example:
    >>> import torch
    >>> from pymks_vae.models.shapes import padded_shape, spatial_shape, wrap_pad
    >>> spatial_shape(21), spatial_shape((15, 15, 15)), padded_shape((21, 50), 16)
    ((21, 21), (15, 15, 15), (32, 64))
    >>> wrap_pad(torch.arange(3.0).view(1, 1, 1, 3), (1, 5)).tolist()
    [[[[0.0, 1.0, 2.0, 0.0, 1.0]]]]
"""
import numbers

import torch

__all__ = ["spatial_shape", "image_hw", "padded_shape", "wrap_pad", "crop"]


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def spatial_shape(image_size, name="image_size"):
    """``image_size`` as a tuple of 2 or 3 positive ints.

    Args:
        image_size: an int (a square, 2D: the models' historical meaning), or a sequence ``(H, W)``
            or ``(X, Y, Z)`` of ints.
        name: the argument's name, for error messages.

    Returns:
        tuple of 2 or 3 ints.

    Raises:
        ValueError: anything else (bools, floats, 1 or 4+ axes, sizes < 1).

    Example:
        >>> spatial_shape(64), spatial_shape([32, 32, 32])
        ((64, 64), (32, 32, 32))
    """
    if _is_int(image_size):
        shape = (int(image_size), int(image_size))
    else:
        try:
            shape = tuple(image_size)
        except TypeError:
            raise ValueError(f"{name} must be an int, (H, W) or (X, Y, Z) of ints, got {image_size!r}") from None
        if len(shape) not in (2, 3) or not all(_is_int(v) for v in shape):
            raise ValueError(f"{name} must be an int, (H, W) or (X, Y, Z) of ints, got {image_size!r}")
        shape = tuple(int(v) for v in shape)
    if min(shape) < 1:
        raise ValueError(f"{name} must be positive, got {image_size!r}")
    return shape


def image_hw(image_size, name="image_size", owner=None):
    """``image_size`` as a 2D ``(H, W)``; ValueError else, naming ``owner`` when it is 2D only.

    Example:
        >>> image_hw(32), image_hw((20, 30))
        ((32, 32), (20, 30))
    """
    shape = spatial_shape(image_size, name)
    if len(shape) != 2:
        who = owner or "this model"
        raise ValueError(f"{who} is 2D only, but {name}={image_size!r} has {len(shape)} axes; "
                         "3D volumes need encoder='cnn' and decoder='cnn'")
    return shape


def padded_shape(shape, factor):
    """Each axis of ``shape`` rounded up to a multiple of ``factor``.

    Example:
        >>> padded_shape((64, 21, 15), 16)
        (64, 32, 16)
    """
    return tuple(-(-int(s) // factor) * factor for s in shape)


def wrap_pad(x, shape):
    """Extend the trailing ``len(shape)`` axes of ``x`` periodically to ``shape`` (each >= x's).

    Indexing modulo the size, rather than ``F.pad(mode="circular")``, also handles pads longer
    than the field (a 5x5 field wrapped to 16x16). The field keeps indices ``0..N-1``; the wrapped
    copy follows it, so :func:`crop` undoes it.

    Args:
        x: a tensor whose trailing ``len(shape)`` axes are spatial.
        shape: the padded sizes of those axes.

    Returns:
        a new tensor, ``x.shape[:-len(shape)] + tuple(shape)``.

    Example:
        >>> import torch
        >>> wrap_pad(torch.arange(3.0)[None], (7,))
        tensor([[0., 1., 2., 0., 1., 2., 0.]])
        >>> crop(wrap_pad(torch.rand(2, 1, 5, 5), (16, 16)), (5, 5)).shape
        torch.Size([2, 1, 5, 5])
    """
    first = x.ndim - len(shape)
    for axis, (n, p) in enumerate(zip(x.shape[first:], shape), start=first):
        if p != n:
            x = x.index_select(axis, torch.arange(p, device=x.device) % n)
    return x


def crop(x, shape):
    """The first ``shape`` entries of the trailing ``len(shape)`` axes of ``x`` (the inverse of :func:`wrap_pad`).

    Args:
        x: a tensor whose trailing ``len(shape)`` axes are spatial.
        shape: the sizes to keep (each at most x's).

    Returns:
        a view of ``x``.

    Example:
        >>> import torch
        >>> crop(torch.rand(2, 1, 16, 16), (5, 7)).shape
        torch.Size([2, 1, 5, 7])
    """
    index = (Ellipsis,) + tuple(slice(0, int(s)) for s in shape)
    return x[index]
