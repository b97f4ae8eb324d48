"""One rank of the distributed tests (tests/test_distributed.py), started by torchrun.

Trains two tiny VAEs - the spatial-statistics loss (reduction "batchmean") and the data-space loss
("sum") - on 32x32 lines with a global batch of 8, and has rank 0 (and every rank, for the
comparison between ranks) save the weights and histories in --out. ``--fail-rank R`` makes rank R
raise mid-epoch instead, to test that the whole run stops.

Usage:
    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py --out DIR [--epochs 2]
        [--max-epochs-this-call K] [--resume] [--fail-rank R [--stall-rank S]]
"""
import argparse
import os
import sys
import time

import torch

from pymks_vae import distributed
from pymks_vae.datasets import generate_lines
from pymks_vae.losses import DataSpaceLoss, SpatialStatsLoss
from pymks_vae.models import VAE
from pymks_vae.training import TrainConfig, train_vae

SIZE = 32
N_IMAGES = 24
BATCH = 8


def lines():
    """The tests' training images (the same on every rank and in the test process)."""
    images, _, _ = generate_lines(range(N_IMAGES), size=SIZE, seed=5)
    return torch.from_numpy(images)[:, None]


def model():
    """The tests' initial model (the same weights on every rank and in the test process)."""
    torch.manual_seed(0)
    return VAE(latent_dim=3, image_size=SIZE, encoder="cnn", decoder="cnn")


def losses():
    """Name -> loss: one of each reduction, so both rank weightings are exercised."""
    return {"stats": SpatialStatsLoss(scale=5.0, cutoff=None, centre=False), "data": DataSpaceLoss()}


def config(out, name, epochs, max_epochs_this_call=None):
    return TrainConfig(epochs=epochs, batch_size=BATCH, lr=3e-3, progress=False,
                       checkpoint_path=os.path.join(out, f"{name}.ckpt"), max_epochs_this_call=max_epochs_this_call)


def _failing_batches(data, rank_to_fail, rank_to_stall=None):
    """Batches of ``data`` (a callable's form), raising on ``rank_to_fail`` at the third batch;
    ``rank_to_stall`` sleeps there for 60 s instead (busy in its own code when the launcher stops it)."""
    rank = distributed.context().rank

    def batches():
        for k, s in enumerate(range(0, data.shape[0], BATCH)):
            if k == 2 and rank == rank_to_fail:
                raise ValueError(f"planted failure on rank {rank}")
            if k == 2 and rank == rank_to_stall:
                time.sleep(60)
            yield data[s : s + BATCH]

    return batches


def record_first_gradients(model, path):
    """Save the gradients the optimizer's first step sees (after DDP's average) to ``path``.

    Returns:
        the hook's handle (``.remove()`` it).
    """
    names = {p: n for n, p in model.named_parameters()}
    done = []

    def hook(optimizer, args, kwargs):
        if not done:
            done.append(True)
            grads = {names[p]: p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None}
            torch.save(grads, path)

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    return register_optimizer_step_pre_hook(hook)


def readout_run(data, args, ctx):
    """The statistics encoder with the linear read-out term, its head solved on each rank's share."""
    from pymks_vae.losses import LinearReadoutLoss

    torch.manual_seed(0)
    m = VAE(latent_dim=2, image_size=SIZE, encoder="stats", decoder="cnn", stats_head=True,
            encoder_options={"cutoff": 3, "one_point": True, "skip": True})
    loss = LinearReadoutLoss(SpatialStatsLoss(scale=5.0, cutoff=3, centre=False), m, weight=8.0)
    history = train_vae(m, loss, data, config(args.out, "readout", args.epochs))
    torch.save({"state": m.state_dict(), "history": history}, os.path.join(args.out, f"readout.rank{ctx.rank}.pt"))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-epochs-this-call", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fail-rank", type=int)
    p.add_argument("--stall-rank", type=int, help="with --fail-rank: this rank sleeps where the other fails")
    p.add_argument("--readout", action="store_true", help="train the statistics encoder with the read-out term only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ctx = distributed.init_distributed()
    try:
        data = lines()
        if args.readout:
            readout_run(data, args, ctx)
            return 0
        if args.fail_rank is not None:
            train_vae(model(), DataSpaceLoss(), _failing_batches(data, args.fail_rank, args.stall_rank),
                      config(args.out, "fail", args.epochs))
            return 0
        for name, loss in losses().items():
            m = model()
            handle = record_first_gradients(m, os.path.join(args.out, f"{name}.grads.rank{ctx.rank}.pt"))
            history = train_vae(m, loss, data, config(args.out, name, args.epochs, args.max_epochs_this_call),
                                val_data=data[:6], resume=args.resume)
            handle.remove()
            torch.save({"state": m.state_dict(), "history": history},
                       os.path.join(args.out, f"{name}.rank{ctx.rank}.pt"))
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
