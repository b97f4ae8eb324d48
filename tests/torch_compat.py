"""What the registered operators raise on the torch they run under.

Before torch 2.14 a ``c10::ValueError`` thrown through a registered operator crashed the process
(seen on torch 2.11 on the lent GPU machine), so the kernels raise their value errors there as
``RuntimeError`` tagged "ValueError: " (csrc/two_point.h). The Python API (``pymks_vae.ops``) turns
them back into ``ValueError``; only the raw ``torch.ops.pymks_vae.*`` calls show the difference.
"""
import torch

TAGGED_VALUE_ERRORS = torch.__version__ < (2, 14)


def raw_op_error(exc):
    """The exception class a raw operator call raises where the kernel raises ``exc``.

    Args:
        exc: the exception class the kernel means (ValueError, TypeError, RuntimeError, ...).

    Returns:
        ``exc``, or RuntimeError for ValueError before torch 2.14.
    """
    return RuntimeError if (exc is ValueError and TAGGED_VALUE_ERRORS) else exc
