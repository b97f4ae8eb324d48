"""Non-contiguous views of a field, for tests that the operators read strided input right."""
import torch

LAYOUTS = ("channels_last", "every_other")


def strided_view(x, layout, device):
    """``x`` (B, C, *spatial) on ``device`` as a non-contiguous view with the same values:
    ``"channels_last"`` (states innermost) or ``"every_other"`` (every other element of a wider last axis)."""
    if layout == "channels_last":
        return x.to(device).movedim(1, -1).contiguous().movedim(-1, 1)
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=device)
    wide[..., ::2] = x.to(device)
    return wide[..., ::2]
