"""The training step off the host: data checks on the first batch only, the loss read once per
epoch, the spatial-statistics loss under autocast, torch.compile and (on a GPU) CUDA graphs."""
import copy
import threading
import warnings

import pytest
import torch

from pymks_vae import _extension, ops
from pymks_vae.losses import DataSpaceLoss, SpatialStatsLoss
from pymks_vae.models import VAE
from pymks_vae.training import TrainConfig, train_vae

SIZE = 16


def tiny_model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return VAE(latent_dim=2, image_size=SIZE, encoder="cnn", decoder="cnn").to(device)


def binary_images(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, SIZE, SIZE, generator=g) > 0.5).float()


LOSSES = {
    "fused": lambda x: SpatialStatsLoss(cutoff=None).calibrate(x),           # periodic, every lag: fused kernel
    "window": lambda x: SpatialStatsLoss(cutoff=3).calibrate(x),             # two_point_stats + its backward
    "two_states": lambda x: SpatialStatsLoss(states=(0.0, 1.0), correlations=((0, 0), (0, 1)), cutoff=None,
                                             indicator="straight_through").calibrate(x),
}


# ----------------------------------------------------------------------------- data checks
def test_data_checks_switch_per_thread_and_block():
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    x[0, 0, 3, 3] = float("nan")
    mask = torch.full((8, 8), 2.0, dtype=torch.float64)  # outside [0, 1]
    assert ops.data_checks_enabled()
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        ops.two_point_stats(x, [(0, 0)])
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        ops.two_point_stats(x.nan_to_num(), [(0, 0)], mask=mask)
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        ops.spatial_stats_loss(x, torch.zeros_like(x))
    seen = []
    with ops.data_checks(False):
        assert not ops.data_checks_enabled()
        # no error, no value read back: the NaN flows into the result
        assert torch.isnan(ops.two_point_stats(x, [(0, 0)])[0]).all()
        assert torch.isnan(ops.spatial_stats_loss(x, torch.zeros_like(x), reduction="none")[0])
        ops.two_point_stats(x.nan_to_num(), [(0, 0)], mask=mask)
        with ops.data_checks(True):
            assert ops.data_checks_enabled()
        assert not ops.data_checks_enabled()
        other = threading.Thread(target=lambda: seen.append(ops.data_checks_enabled()))
        other.start()
        other.join()
        # argument checks read no data and always run
        with pytest.raises(ValueError, match="correlations"):
            ops.two_point_stats(x, [(0, 5)])
    assert seen == [True]  # the switch is per thread
    assert ops.data_checks_enabled()
    if _extension.has_extension():
        assert _extension._C._data_checks_enabled()
    with pytest.raises(TypeError, match="enabled must be True or False"):
        with ops.data_checks("no"):
            pass


@pytest.mark.parametrize("mode,expected", [("first", [True, False, False, False]), ("always", [True] * 4)])
def test_training_checks_the_data_on_the_first_batch_only(mode, expected):
    x = binary_images(32)
    loss = SpatialStatsLoss(cutoff=None).calibrate(x)
    states = []

    def recording(x_hat, x, mu, logvar):
        states.append(ops.data_checks_enabled())
        return loss(x_hat, x, mu, logvar)

    recording.reduction = loss.reduction
    train_vae(tiny_model(), recording, x, TrainConfig(epochs=1, batch_size=8, progress=False, data_checks=mode))
    assert states == expected
    assert ops.data_checks_enabled()  # back on after training
    with pytest.raises(ValueError, match="data_checks must be 'first' or 'always'"):
        TrainConfig(data_checks="never")


@pytest.mark.parametrize("mode", ["first", "always"])
def test_a_non_finite_batch_stops_training_before_the_checkpoint(mode, tmp_path):
    x = binary_images(32)
    x[13, 0, 2, 2] = float("nan")  # in the second batch (no shuffling): past the checked first one
    cfg = TrainConfig(epochs=2, batch_size=8, progress=False, shuffle=False, data_checks=mode,
                      checkpoint_path=str(tmp_path / "c.pt"))
    if mode == "first":
        with pytest.raises(FloatingPointError, match="during epoch 1 .*data_checks='always'"):
            train_vae(tiny_model(), DataSpaceLoss(), x, cfg)
    else:  # every batch checked: the loss of the bad batch is refused at once
        with pytest.raises(FloatingPointError, match="the loss became nan at epoch 1"):
            train_vae(tiny_model(), DataSpaceLoss(), x, cfg)
    assert not (tmp_path / "c.pt").exists()


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_loss_under_bf16_autocast_computes_statistics_in_fp32(kind, device):
    x = binary_images(8)
    loss_fn = LOSSES[kind](x)
    x = x.to(device)
    model = tiny_model(device=device)
    noise = torch.randn(8, 2, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        x_hat, mu, logvar = model(x, noise=noise)
        assert x_hat.dtype == torch.bfloat16  # the network runs in bf16 ...
        total, parts = loss_fn(x_hat, x, mu, logvar)
    assert total.dtype == torch.float32 and parts["stats"].dtype == torch.float32  # ... the statistics in fp32
    # the same as the loss of the bf16 outputs cast up by hand, outside autocast
    ref, _ = loss_fn(x_hat.detach().float(), x, mu.detach().float(), logvar.detach().float())
    assert float(total.detach()) == pytest.approx(float(ref), rel=1e-6)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with pytest.raises(TypeError, match="float32 or float64"):  # the operators themselves refuse bf16
        ops.spatial_stats_loss(x_hat.detach(), x.bfloat16())


def test_data_space_loss_under_bf16_autocast():
    x = binary_images(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat, mu, logvar = tiny_model()(x, noise=torch.randn(4, 2))
        total, _ = DataSpaceLoss()(x_hat, x, mu, logvar)
    assert total.dtype == torch.float32
    total.backward()


# ----------------------------------------------------------------------------- torch.compile
def _step_fn(model, loss_fn):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(x, noise):
        opt.zero_grad(set_to_none=True)
        x_hat, mu, logvar = model(x, noise=noise)
        total, _ = loss_fn(x_hat, x, mu, logvar)
        total.backward()
        opt.step()
        return total.detach()

    return step


@pytest.mark.parametrize("kind", ["fused", "window"])
def test_compiled_training_step_matches_eager(kind):
    # aot_eager traces everything inductor would (dynamo, the fake kernels, AOT autograd through
    # the operators' registered backward) without inductor's minute of C++ compilation on 2 cores.
    x = binary_images(4)
    loss_fn = LOSSES[kind](x)
    eager_model = tiny_model()
    compiled_model = copy.deepcopy(eager_model)
    eager = _step_fn(eager_model, loss_fn)
    compiled = torch.compile(_step_fn(compiled_model, loss_fn), backend="aot_eager")
    with ops.data_checks(False):
        for k in range(3):
            noise = torch.randn(4, 2)
            a, b = eager(x, noise), compiled(x, noise)
            # the first loss is the same computation; later ones follow weights after Adam steps,
            # which are nearly sign(g) * lr and so turn rounding differences into small weight changes
            assert float(b) == pytest.approx(float(a), rel=1e-6 if k == 0 else 1e-3)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_model_and_loss_compile_without_graph_breaks(kind):
    x = binary_images(4)
    loss_fn = LOSSES[kind](x)
    model = tiny_model()

    def forward(x, noise):
        x_hat, mu, logvar = model(x, noise=noise)
        return loss_fn(x_hat, x, mu, logvar)[0]

    noise = torch.randn(4, 2)
    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    assert float(compiled(x, noise).detach()) == pytest.approx(float(forward(x, noise).detach()), rel=1e-6)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_cuda_graph_captures_the_whole_training_step(kind):
    x = binary_images(8).cuda()
    loss_fn = LOSSES[kind](x.cpu())
    model = tiny_model(device="cuda")
    twin = copy.deepcopy(model)
    noise = torch.randn(8, 2, device="cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    twin_step = _step_fn(twin, loss_fn)

    def body():
        x_hat, mu, logvar = model(x, noise=noise)
        total, _ = loss_fn(x_hat, x, mu, logvar)
        total.backward()
        opt.step()
        return total.detach()

    with ops.data_checks(False):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: plans, cuFFT plans and device tables are made here
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_loss = body()
        losses = []
        for _ in range(3):
            graph.replay()
            losses.append(float(static_loss))
        expected = [float(twin_step(x, noise)) for _ in range(5)][2:]
    # the replays' losses are those of steps 3-5 of the eager twin (after the 2 warm-up steps);
    # Adam's nearly sign(g) * lr steps turn rounding differences (the GPU's reduction order differs
    # between the graph and the eager run) into weight changes of up to lr, so the losses agree to a
    # few 1e-3 (1.3e-3 seen on an H200)
    assert losses == pytest.approx(expected, rel=4e-3)
    assert len(set(losses)) == 3, f"the replays did not update the model: losses {losses}"


@pytest.mark.cuda
def test_cuda_training_loop_syncs_per_epoch_not_per_batch():
    """With CUDA's sync debug mode counting every host synchronisation, an epoch of 8 batches
    synchronises as often as an epoch of 2: none of them comes from the step."""

    def syncs(n_batches):
        x = binary_images(8 * n_batches)
        loss = SpatialStatsLoss(cutoff=3).calibrate(x)
        model = tiny_model()
        cfg = TrainConfig(epochs=1, batch_size=8, progress=False, device="cuda")
        train_vae(model, loss, x, cfg)  # warm: cuFFT plans, device tables
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_vae(model, loss, x, cfg)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    two = syncs(2)
    assert two >= 1  # the once-per-epoch read of the loss is seen: the counting works
    # not more for 4 times the batches (one fewer was seen on an H200: a one-time sync in the first
    # measured run); a per-batch sync would add at least 6
    assert syncs(8) <= two
