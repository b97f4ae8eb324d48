"""The VAE transformer: a learned latent space of 2D or 3D microstructures for scikit-learn.

:class:`VAETransformer` reads numpy, dask or xarray input through :mod:`pymks_vae.adapters`,
trains a :class:`pymks_vae.models.VAE` with :func:`pymks_vae.training.train_vae` on the loss of
:mod:`pymks_vae.losses`, and encodes / decodes in blocks (lazily, one block per sample chunk, for
dask input). Its pickles and checkpoint files are written by :mod:`pymks_vae.persistence`. It is
also importable from :mod:`pymks_vae.transformers` and as ``pymks_vae.VAETransformer``.

Example:
    >>> from pymks_vae.microstructures import generate_classes
    >>> from pymks_vae.vae_transformer import VAETransformer
    >>> x, _ = generate_classes(4, (16, 16), seed=0)
    >>> VAETransformer(latent_dim=2, epochs=1, batch_size=8, random_state=0).fit_transform(x).shape
    (16, 2)
"""
import math
import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from pymks_vae import _extension
from pymks_vae import correlations as _corr
from pymks_vae.adapters import STATE_DIM, _as_pymks_array, _is_dask, _sample_coords, _spatial_dims, _unnamed
from pymks_vae.persistence import _jsonable, _model_from_bytes, _ModelSnapshot, _read_checkpoint, _state_bytes, \
    _write_checkpoint

__all__ = ["VAETransformer"]


def _to_tensor(block, grey):
    """PyMKS-layout numpy block -> channels-first float32 tensor ``(n, C, *spatial)``."""
    x = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    return x.unsqueeze(1) if grey else x.movedim(-1, 1).contiguous()


def _from_tensor(x, grey):
    x = x.detach().cpu().numpy().astype(np.float64)
    return x[:, 0] if grey else np.moveaxis(x, 1, -1)


def _encode_block(block, snapshot_or_model, grey, batch_size=256):
    model = snapshot_or_model.model() if isinstance(snapshot_or_model, _ModelSnapshot) else snapshot_or_model
    block = np.asarray(block)
    if not np.isfinite(block).all():
        raise ValueError("X contains NaN or infinity; VAETransformer needs finite values")
    out = []
    with torch.no_grad(), _extension.one_thread_per_task():
        for start in range(0, len(block), batch_size):
            mu, _ = model.encode(_to_tensor(block[start:start + batch_size], grey))
            out.append(mu.double().numpy())
    return np.concatenate(out) if out else np.empty((0, model.config["latent_dim"]))


def _decode_block(block, snapshot_or_model, grey, batch_size=256):
    model = snapshot_or_model.model() if isinstance(snapshot_or_model, _ModelSnapshot) else snapshot_or_model
    block = np.asarray(block)
    if not np.isfinite(block).all():
        raise ValueError("Z contains NaN or infinity")
    out = []
    with torch.no_grad(), _extension.one_thread_per_task():
        for start in range(0, len(block), batch_size):
            z = torch.from_numpy(np.ascontiguousarray(block[start:start + batch_size], dtype=np.float32))
            out.append(_from_tensor(model.decode(z), grey))
    return np.concatenate(out)


def _stats_loss(cls, kwargs, periodic=True, cutoff=None):
    """A ``SpatialStatsLoss`` comparing the statistics with the given boundary and lag window.

    Args:
        cls: the loss class (:class:`pymks_vae.losses.SpatialStatsLoss`).
        kwargs: its other constructor arguments.
        periodic: periodic statistics (True) or zero padding with overlap normalisation.
        cutoff: largest lag compared along each axis (None: the whole field).
    """
    return cls(periodic=periodic, cutoff=cutoff, **kwargs)


#: The lag window the statistics encoder reads (``encoder="auto"``/``"stats"``): lags up to 10
#: pixels (voxels) along each axis, clipped to the field. Chosen on tuning seeds (docs/pymks.md):
#: the loss's own window, read from the data's correlation length, was too small for the random
#: fields (5 px: latent-2 R^2 0.66 against 0.86) and too large for the lamellae (21 px: accuracy 0.83
#: against 0.96, far lags adding sampling noise); 31 px was worse again on the lamellae.
STATS_ENCODER_CUTOFF = 10

#: ``epochs="auto"`` trains at least this many epochs and optimisation steps.
AUTO_MIN_EPOCHS, AUTO_MIN_STEPS = 60, 1000


def _is_auto(value):
    return isinstance(value, str) and value == "auto"


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _seed_from(random_state):
    if random_state is None:
        return int(np.random.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**31 - 1))
    return _check_int("random_state", random_state, 0)



class VAETransformer(TransformerMixin, BaseEstimator):
    """A VAE latent space of 2D or 3D microstructures as a scikit-learn transformer.

    ``fit`` trains a :class:`pymks_vae.models.VAE` on the microstructures - by default with the
    spatial-statistics loss, which compares the two-point statistics of input and reconstruction
    instead of their pixels - and ``transform`` returns the latent means, ``(n_samples,
    latent_dim)``, ready for a classifier or regressor.

    Inputs, 2D ``(n, H, W[, n_state])`` or 3D ``(n, X, Y, Z[, n_state])``, of any size (odd,
    prime, non-square: the statistics encoder reads statistics of any size; the decoder (and the
    ``"cnn"`` encoder) draws the field wrapped periodically to the next multiple of 16 and crops it
    back, :mod:`pymks_vae.models.shapes`):
        - grey microstructures ``(n, *spatial)`` with values in [0, 1]; the spatial-statistics
          loss sees them through soft phase indicators of the states 0.0 and 1.0 (so the state
          indices of ``correlations`` mean the same phases as with one-hot input);
        - one-hot / phase-probability fields ``(n, *spatial, n_state)``, any ``n_state`` >= 2, as
          produced by ``pymks.PrimitiveTransformer`` (one-hot or hat basis: values in [0, 1],
          summing to 1 over the states); the model then outputs softmax phase probabilities.
        numpy arrays, dask arrays (``fit`` streams them one chunk of samples at a time;
        ``transform`` stays lazy) and xarray DataArrays (dims read by name: ``"sample"``, ``"state"``
        for one-hot input, the rest spatial) are accepted.

    Args:
        latent_dim: size of the latent space.
        encoder: ``"auto"`` (default), ``"stats"``, ``"cnn"`` or ``"resnet152"`` (2D only; see
            :class:`pymks_vae.models.VAE`). ``"auto"`` is ``"stats"`` for the spatial-statistics
            loss: the encoder reads the two-point statistics the loss compares (same pairs and
            boundary, lags up to 10 px) and the phase fractions
            (:class:`pymks_vae.models.encoders.StatsEncoder`, with a linear path to the latent
            beside its hidden layer), so the latent cannot depend on where grains sit; and
            ``"cnn"`` (pixels) for ``loss="data"``.
        correlations: state pairs compared by the spatial-statistics loss: ``"auto"`` (default)
            every pair ``(i, j)``, ``i <= j < n_state - 1``
            (:func:`pymks_vae.losses.independent_correlations`): ``(0, 0)`` for two phases and
            grey input, ``(0, 0), (0, 1), (1, 1)`` for three. Phase indicators sum to 1, so these
            pairs determine every auto- and cross-correlation of all phases, lag by lag, and none
            is redundant (PyMKS's default, ``None`` here, ``[(0, 0), ..., (0, n_state-1)]``, holds
            a redundant last pair and, from three phases on, nothing on how the phases other than
            0 arrange among themselves). Or a list of ``(i, j)`` pairs of state indices.
        periodic_boundary: periodic two-point statistics in the loss.
        cutoff: largest lag compared by the loss along each axis: ``"auto"`` (default) the window
            where the training data's statistics hold structure, beyond which single samples differ
            only by sampling noise (:func:`pymks_vae.losses.auto_cutoff`, measured on the first
            block of up to 256 samples); None for every lag of the field; or an int (values above
            ``(min(spatial) - 1) // 2`` are clipped to it, as in PyMKS).
        loss: ``"spatial_stats"`` (the paper's loss) or ``"data"`` (pixel-space reconstruction).
        beta: weight of the KL term: ``"auto"`` (default) is
            :data:`pymks_vae.losses.DEFAULT_BETA` for the spatial-statistics loss (whose statistics
            term is the fraction of their variance left unexplained, the same at every size) and
            1 for ``loss="data"`` (the vanilla VAE's pixel SSE); or a number >= 0.
        stats_scale: factor on the statistics in the loss: ``"auto"`` (default) ``1 / sqrt(var_f)``,
            ``var_f`` their variance over the first block of training data (up to 256 samples),
            averaged over pairs and lags in the window; or a positive number. Ignored by
            ``loss="data"``.
        epochs: training epochs, or ``"auto"`` (default): at least 60 epochs and at least 1000
            optimisation steps (small data sets need more passes to learn; a 300-sample 64x64 fit
            runs 60 epochs, about 35 s on two CPU cores).
        batch_size: training batch size.
        learning_rate: Adam learning rate.
        device: ``"auto"`` (GPU when available), ``"cpu"`` or ``"cuda"``; used for training only,
            the fitted model lives on the CPU.
        random_state: None, an int or a numpy random state: seeds initialisation and shuffling.
        verbose: show a tqdm progress bar while training.
        spatial_ndim: ``"auto"``, 2 or 3: how many axes of the input are spatial. A 4-axis array
            is either 2D one-hot ``(n, H, W, n_state)`` or 3D grey ``(n, X, Y, Z)``: ``"auto"``
            (default) reads 3 axes as 2D grey, 4 axes as 2D one-hot (their last axis must sum to
            1, else a ValueError says to pass ``spatial_ndim=3``) and 5 axes as 3D one-hot; 3
            reads 4 axes as 3D grey; 2 refuses 5 axes. A DataArray with named dims says which it
            is (a ``"state"`` dim or not). ``transform`` reads its input as ``fit`` did.
        one_point: the spatial-statistics loss also compares the phases' volume fractions, as the
            fraction of their variance over the first block left unexplained
            (:class:`pymks_vae.losses.SpatialStatsLoss`'s ``one_point``; off by itself when every
            sample has the same composition). Default False. The loss compares autocovariances,
            which keep the volume fraction in one lag only; the linear read-out term below
            recovers it (on ``generate_classes``, linear R^2 of the volume fraction 0.997-0.998
            against PCA's 0.995 at latent size 2, tuning seeds). Measured without that term, ``one_point=True`` raised
            it from 0.63 to 0.98 at latent size 2, but on families where the fraction varies
            within classes it took the latent from what tells classes apart (inclusions at latent
            size 2: accuracy 0.75-0.82 against 0.86-0.90 on three tuning seeds, and 0.23 on one of
            three evaluation seeds; docs/pymks.md). Ignored by ``loss="data"``.
        linear_readout: weight of the linear read-out term (default 8; 0 turns it off): the
            latent means must also predict the statistics the encoder reads (Pareto-scaled; the
            phase fractions with 0.8 of the term's weight) through a linear map
            (:class:`pymks_vae.losses.LinearReadoutLoss`, ``model_.stats_head``) - PCA's
            criterion, in the currency of the statistics term. The map is solved by least squares
            on each batch when ``batch_size > latent_dim + 1``, else trained with the model.
            Without the term the nonlinear decoder let the latent place samples along curves:
            classes apart, but a continuous descriptor out of order for a linear regressor
            (docs/pymks.md). The weight and share were set on tuning seeds
            (docs/spatial_stats_loss.md): more weight on the two-point part costs the random
            fields' correlation length, less costs the lamellar spacing and the volume fraction.
            Only with the statistics encoder and the spatial-statistics loss; ignored otherwise.

    Attributes:
        model_: the trained ``torch.nn.Module`` (on the CPU, eval mode).
        input_shape_: per-sample shape seen in fit, ``(*spatial)`` or ``(*spatial, n_state)``.
        spatial_shape_: the spatial shape seen in fit, ``(H, W)`` or ``(X, Y, Z)``.
        n_state_: number of states of one-hot input, None for grey input.
        correlations_: the pairs the spatial-statistics loss compared (None for ``loss="data"``).
        stats_scale_: the factor on the statistics actually used (1.0 for ``loss="data"``).
        cutoff_: the loss's lag window actually used (None: every lag, and for ``loss="data"``).
        history_: the training history returned by :func:`pymks_vae.training.train_vae`.

    Example:
        >>> from pymks_vae.microstructures import generate_classes
        >>> from pymks_vae import VAETransformer
        >>> x, y = generate_classes(4, (16, 16), seed=0)
        >>> vae = VAETransformer(latent_dim=3, epochs=1, batch_size=8, random_state=0).fit(x)
        >>> vae.transform(x).shape, vae.get_feature_names_out().tolist()
        ((16, 3), ['vae0', 'vae1', 'vae2'])

        Three phases in 3D, 15^3 voxels:

        >>> import numpy as np
        >>> from pymks_vae.microstructures import generate_multiphase
        >>> x3 = np.eye(3)[generate_multiphase(8, (15, 15, 15), seed=0)]      # one-hot (8, 15, 15, 15, 3)
        >>> vae3 = VAETransformer(latent_dim=2, epochs=1, batch_size=4, random_state=0).fit(x3)
        >>> vae3.transform(x3).shape, vae3.correlations_
        ((8, 2), [(0, 0), (0, 1), (1, 1)])
    """

    def __init__(self, latent_dim=9, encoder="auto", correlations="auto", periodic_boundary=True,
                 cutoff="auto", loss="spatial_stats", beta="auto", stats_scale="auto", epochs="auto", batch_size=16,
                 learning_rate=3e-3, device="auto", random_state=None, verbose=False, spatial_ndim="auto",
                 one_point=False, linear_readout=8.0):
        self.latent_dim = latent_dim
        self.encoder = encoder
        self.correlations = correlations
        self.periodic_boundary = periodic_boundary
        self.cutoff = cutoff
        self.loss = loss
        self.beta = beta
        self.stats_scale = stats_scale
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.spatial_ndim = spatial_ndim
        self.one_point = one_point
        self.linear_readout = linear_readout

    # ------------------------------------------------------------------ validation
    def _check_params(self):
        _check_int("latent_dim", self.latent_dim, 1)
        from pymks_vae.models.encoders import ENCODERS

        if not (isinstance(self.encoder, str) and self.encoder in ("auto",) + ENCODERS):
            raise ValueError(f"encoder must be one of {('auto',) + ENCODERS}, got {self.encoder!r}")
        if not _is_auto(self.epochs):
            _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 2)
        if self.loss not in ("spatial_stats", "data"):
            raise ValueError(f"loss must be 'spatial_stats' or 'data', got {self.loss!r}")
        for name in ("beta", "learning_rate"):
            value = getattr(self, name)
            if name == "beta" and _is_auto(value):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.stats_scale, str) and self.stats_scale == "auto"):
            value = self.stats_scale
            if (isinstance(value, (bool, str)) or not isinstance(value, numbers.Real)
                    or not (np.isfinite(value) and value > 0)):
                raise ValueError(f"stats_scale must be 'auto' or a finite number > 0, got {value!r}")
        if self.cutoff is not None and not _is_auto(self.cutoff):
            _check_int("cutoff", self.cutoff, 0)
        if not isinstance(self.one_point, (bool, np.bool_)):
            raise ValueError(f"one_point must be True or False, got {self.one_point!r}")
        value = self.linear_readout
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value < 0:
            raise ValueError(f"linear_readout must be a finite number >= 0, got {value!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not isinstance(self.periodic_boundary, (bool, np.bool_)):
            raise TypeError(f"periodic_boundary must be a bool, got {self.periodic_boundary!r}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:k]', got {self.device!r}")
        if not (_is_auto(self.spatial_ndim) or (isinstance(self.spatial_ndim, numbers.Integral)
                                                and not isinstance(self.spatial_ndim, bool)
                                                and self.spatial_ndim in (2, 3))):
            raise ValueError(f"spatial_ndim must be 'auto', 2 or 3, got {self.spatial_ndim!r}")
        if isinstance(self.correlations, str) and not _is_auto(self.correlations):
            raise ValueError(f"correlations must be 'auto', None or a list of (i, j) pairs, got {self.correlations!r}")

    def _layout(self, X, aligned, name="X", fitted_ndim=None):
        """How ``X`` is read: ``(grey, spatial_ndim)`` (see the class docstring).

        Args:
            X: the numpy/dask array in PyMKS's layout.
            aligned: the aligned DataArray (its dim names decide), or None.
            name: the argument's name, for error messages.
            fitted_ndim: the spatial_ndim seen in fit (``transform`` reads as ``fit`` did).
        """
        want = self.spatial_ndim if not _is_auto(self.spatial_ndim) else fitted_ndim
        if aligned is not None and not _unnamed(aligned):
            grey = STATE_DIM not in aligned.dims
            ndim = X.ndim - 1 - (0 if grey else 1)
            if want is not None and ndim != want:
                raise ValueError(f"{name} is a DataArray with dims {tuple(aligned.dims)}: {ndim} spatial dims, but "
                                 f"spatial_ndim={want}")
        elif want is None:  # the default reading: 3 axes 2D grey, 4 axes 2D one-hot, 5 axes 3D one-hot
            grey, ndim = X.ndim == 3, (2 if X.ndim in (3, 4) else 3)
        else:
            grey, ndim = X.ndim == want + 1, int(want)
        if X.ndim not in (ndim + 1, ndim + 2) or ndim not in (2, 3):
            raise ValueError(
                f"{name} must be 2D microstructures, (n_samples, H, W) grey or (n_samples, H, W, n_state) one-hot, or "
                f"3D ones, (n_samples, X, Y, Z) grey (spatial_ndim=3) or (n_samples, X, Y, Z, n_state) one-hot "
                f"(PyMKS layout); got shape {tuple(X.shape)}"
                + ("" if want is None else f" with spatial_ndim={want}")
            )
        if any(int(s) == 0 for s in X.shape):
            raise ValueError(f"{name} has an empty axis: shape {tuple(X.shape)}")
        return grey, ndim

    @staticmethod
    def _check_values(block, grey, name="X"):
        """Value checks on an in-memory block (numpy input at once, dask input chunk by chunk)."""
        block = np.asarray(block)
        if not np.isfinite(block).all():
            raise ValueError(f"{name} contains NaN or infinity; VAETransformer needs finite values")
        if block.min() < -1e-6 or block.max() > 1 + 1e-6:
            raise ValueError(f"{name} values must lie in [0, 1] (grey levels or phase probabilities); "
                             f"got range [{block.min():.4g}, {block.max():.4g}]")
        if not grey:
            sums = block.sum(axis=-1)
            if np.abs(sums - 1.0).max() > 1e-3:
                layout = "(n, H, W, n_state)" if block.ndim == 4 else "(n, X, Y, Z, n_state)"
                hint = (" A 3D grey volume (n, X, Y, Z) needs spatial_ndim=3: a 4-axis array is otherwise read as "
                        "2D one-hot." if block.ndim == 4 else "")
                raise ValueError(
                    f"{name} has {block.ndim} axes, so it is read as one-hot {layout} phase probabilities, "
                    f"but its last axis does not sum to 1 (found sums in [{sums.min():.3g}, {sums.max():.3g}]). "
                    f"Use pymks.PrimitiveTransformer for the one-hot.{hint}"
                )

    def _fitted_ndim(self):
        return len(getattr(self, "spatial_shape_", None) or self._spatial_of(self.input_shape_, self.n_state_))

    @staticmethod
    def _spatial_of(input_shape, n_state):
        return tuple(input_shape) if n_state is None else tuple(input_shape)[:-1]

    def _check_fitted_input(self, X, aligned, name="X"):
        grey, _ = self._layout(X, aligned, name, fitted_ndim=self._fitted_ndim())
        shape = tuple(int(s) for s in X.shape[1:])
        if not grey and self.n_state_ is not None and shape[-1] != self.n_state_:
            raise ValueError(f"{name} has n_state={shape[-1]} on its last axis, but the transformer was "
                             f"fitted with n_state={self.n_state_}")
        if grey != (self.n_state_ is None):
            axes = "H, W" if self._fitted_ndim() == 2 else "X, Y, Z"
            fitted = f"grey (n, {axes})" if self.n_state_ is None else f"one-hot (n, {axes}, {self.n_state_})"
            raise ValueError(f"{name} has shape {tuple(X.shape)}, but the transformer was fitted on {fitted} input")
        if shape != self.input_shape_:
            raise ValueError(f"{name} has per-sample shape {shape}, but the transformer was fitted on "
                             f"{self.input_shape_}")
        return grey

    # ------------------------------------------------------------------ training
    def _device(self):
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def _epochs(self, n_samples):
        if not _is_auto(self.epochs):
            return int(self.epochs)
        steps = math.ceil(n_samples / int(self.batch_size))
        return max(AUTO_MIN_EPOCHS, math.ceil(AUTO_MIN_STEPS / steps))

    def _encoder(self, loss, grey):
        """``(name, options)`` of the encoder: ``"auto"`` reads the statistics the loss compares
        (their pairs and boundary, in its own window of :data:`STATS_ENCODER_CUTOFF` lags) with
        the spatial-statistics loss, pixels (``"cnn"``) with ``loss="data"``."""
        name = self.encoder
        if _is_auto(name):
            name = "cnn" if self.loss == "data" else "stats"
        if name != "stats":
            return name, None
        stats_loss = getattr(loss, "correlations", None) is not None
        return name, {
            # a grey field is read as it is (one state); one-hot input by the loss's pairs of states
            "correlations": [(0, 0)] if grey or not stats_loss else [tuple(p) for p in loss.correlations],
            "cutoff": STATS_ENCODER_CUTOFF,
            "periodic": bool(self.periodic_boundary),
            # the phase fractions the window's dropped long lags carried, and a linear path to mu
            # for the read-out term (docs/pymks.md, measured)
            "one_point": True,
            "skip": True,
        }

    def _make_loss(self, X, grey, n_state):
        """The training loss; the spatial-statistics loss is calibrated on the first block of ``X``."""
        from pymks_vae import losses

        beta = None if _is_auto(self.beta) else float(self.beta)
        if self.loss == "data":
            return losses.DataSpaceLoss(beta=1.0 if beta is None else beta)
        states = (0.0, 1.0) if grey else tuple(float(s) for s in range(n_state))
        if _is_auto(self.correlations):
            pairs = tuple(losses.independent_correlations(len(states)))
        else:
            pairs = tuple(_corr.resolve_correlations(self.correlations, len(states)))
        scale = None if _is_auto(self.stats_scale) else float(self.stats_scale)
        loss = _stats_loss(losses.SpatialStatsLoss, {"states": states, "correlations": pairs, "scale": scale,
                                                     "beta": beta, "one_point": bool(self.one_point)},
                           bool(self.periodic_boundary), self.cutoff)
        if loss.needs_calibration:  # the scale and/or the auto window, from the first block, not one batch
            first = X[: min(256, X.chunks[0][0] if _is_dask(X) else 256)]
            first = np.asarray(first.compute() if _is_dask(first) else first)
            self._check_values(first, grey)
            try:
                loss.calibrate(_to_tensor(first, grey))
            except ValueError:  # statistics constant over the block (e.g. one phase only): no normalisation
                loss.scale_ = 1.0  # (calibrate fixes the window before it measures the scale, which raised)
                if loss.one_point and loss.one_point_var_ is None:
                    loss.one_point_var_ = 0.0
        return loss

    def _batches(self, X, grey, rng):
        """A zero-argument callable yielding shuffled training batches, one chunk in memory at a time."""
        batch_size = int(self.batch_size)
        if _is_dask(X):
            X = X.rechunk((X.chunks[0],) + tuple(-1 for _ in X.shape[1:]))
            blocks = [X.blocks[k] for k in range(X.numblocks[0])]
            load = lambda b: np.asarray(b.compute())  # noqa: E731
        else:
            blocks = [X]
            load = np.asarray

        def stream():
            buffer = None
            for k in rng.permutation(len(blocks)):
                block = load(blocks[k])
                self._check_values(block, grey)
                x = _to_tensor(block, grey)[torch.from_numpy(rng.permutation(len(block)))]
                buffer = x if buffer is None else torch.cat([buffer, x])
                while len(buffer) >= batch_size:
                    yield buffer[:batch_size]
                    buffer = buffer[batch_size:]
            # A batch of one breaks batch norm in training mode; a single leftover waits for the next epoch's shuffle.
            if buffer is not None and len(buffer) >= 2:
                yield buffer

        return stream

    def fit(self, X, y=None):
        """Train the VAE on ``X``.

        Args:
            X: ``(n, *spatial)`` grey or ``(n, *spatial, n_state)`` one-hot, 2D or 3D (see the
                class docstring); numpy, dask (streamed chunk by chunk) or xarray.
            y: ignored (accepted for pipelines).

        Returns:
            self
        """
        from pymks_vae.training import TrainConfig, train_vae

        self._check_params()
        X, aligned = _as_pymks_array(X, state="optional")
        grey, ndim = self._layout(X, aligned)
        if X.shape[0] < 2:
            raise ValueError(f"VAETransformer needs at least 2 samples to fit, got {X.shape[0]}")
        if isinstance(X, np.ndarray):
            self._check_values(X, grey)
        shape = tuple(int(s) for s in X.shape[1:])
        n_state = None if grey else shape[-1]
        spatial = shape[:ndim]
        seed = _seed_from(self.random_state)
        from pymks_vae.models import VAE

        # the loss first: the statistics encoder reads the pairs the loss resolved
        loss = self._make_loss(X, grey, n_state)
        encoder, options = self._encoder(loss, grey)
        readout = encoder == "stats" and self.loss != "data" and float(self.linear_readout) > 0
        torch.manual_seed(seed)
        model = VAE(encoder=encoder, latent_dim=int(self.latent_dim), image_size=spatial,
                    channels=1 if grey else n_state, encoder_options=options, stats_head=readout)
        if readout:
            from pymks_vae.losses import LinearReadoutLoss

            # the head is solved on each batch when the batch leaves a residual to explain
            head = "batch" if LinearReadoutLoss.solvable(int(self.batch_size), int(self.latent_dim)) else "learned"
            loss = LinearReadoutLoss(loss, model, float(self.linear_readout), head=head)
        config = TrainConfig(epochs=self._epochs(X.shape[0]), batch_size=int(self.batch_size), lr=float(self.learning_rate),
                             seed=seed, device=self._device(), progress=bool(self.verbose))
        rng = np.random.default_rng(seed)
        history = train_vae(model, loss, self._batches(X, grey, rng), config)
        self.model_ = model.cpu().eval()
        self.stats_scale_ = float(getattr(loss, "scale_", 1.0))
        self.cutoff_ = getattr(loss, "cutoff_", None)
        self.input_shape_ = shape
        self.spatial_shape_ = spatial
        self.spatial_dims_ = _spatial_dims(aligned)
        self.n_state_ = n_state
        self.correlations_ = list(loss.correlations) if hasattr(loss, "correlations") else None
        self.history_ = history
        return self

    def __sklearn_is_fitted__(self):
        return hasattr(self, "model_")

    # ------------------------------------------------------------------ inference
    def _snapshot(self):
        return _ModelSnapshot(self.model_.config, _state_bytes(self.model_))

    def transform(self, X):
        """Latent means of ``X``.

        Args:
            X: like the fitted input (same per-sample shape): numpy, dask or xarray.

        Returns:
            ``(n_samples, latent_dim)`` float64: numpy for numpy input, a lazy dask array (one
            block per sample chunk) for dask input, a DataArray with dims ``(sample_dim,
            "latent")`` for xarray input (sample coordinates kept).
        """
        check_is_fitted(self)
        X, original = _as_pymks_array(X, state="optional", spatial_dims=getattr(self, "spatial_dims_", None))
        grey = self._check_fitted_input(X, original)
        latent = int(self.model_.config["latent_dim"])
        if isinstance(X, np.ndarray):
            self._check_values(X, grey)
            out = _encode_block(X, self.model_.eval(), grey)
        else:
            import dask

            X = X.rechunk((X.chunks[0],) + tuple(-1 for _ in X.shape[1:]))
            snapshot = dask.delayed(self._snapshot(), pure=True)
            out = X.map_blocks(_encode_block, snapshot, grey, drop_axis=list(range(2, X.ndim)),
                               chunks=(X.chunks[0], (latent,)), dtype=np.float64,
                               meta=np.empty((0, 0), dtype=np.float64))
        if original is None:
            return out
        import xarray as xr

        dim, coords = _sample_coords(original)
        coords["latent"] = list(self.get_feature_names_out())
        return xr.DataArray(out, dims=(dim, "latent"), coords=coords, name="latent_mean")

    def inverse_transform(self, Z):
        """Decode latent vectors into microstructures in PyMKS layout.

        Args:
            Z: ``(n_samples, latent_dim)`` numpy, dask or xarray.

        Returns:
            ``(n, *spatial)`` grey levels or ``(n, *spatial, n_state)`` phase probabilities
            (float64), as numpy / lazy dask / DataArray like ``Z`` (spatial dims named as in fit,
            else ``"x", "y"[, "z"]``).
        """
        check_is_fitted(self)
        Z, original = _as_pymks_array(Z, "Z", state="none")
        latent = int(self.model_.config["latent_dim"])
        if Z.ndim != 2 or int(Z.shape[1]) != latent:
            raise ValueError(f"Z must have shape (n_samples, latent_dim={latent}); got {tuple(Z.shape)}")
        grey = self.n_state_ is None
        if isinstance(Z, np.ndarray):
            out = _decode_block(Z, self.model_.eval(), grey)
        else:
            import dask

            Z = Z.rechunk((Z.chunks[0], -1))
            snapshot = dask.delayed(self._snapshot(), pure=True)
            # Z's latent axis becomes H; W (and the state axis) are new.
            out = Z.map_blocks(_decode_block, snapshot, grey,
                               chunks=(Z.chunks[0],) + tuple((s,) for s in self.input_shape_),
                               new_axis=list(range(2, 1 + len(self.input_shape_))), dtype=np.float64,
                               meta=np.empty((0,) * (1 + len(self.input_shape_)), dtype=np.float64))
        if original is None:
            return out
        import xarray as xr

        dim, coords = _sample_coords(original)
        spatial = getattr(self, "spatial_dims_", None) or ("x", "y", "z")[:self._fitted_ndim()]
        dims = (dim, *spatial) if grey else (dim, *spatial, STATE_DIM)
        return xr.DataArray(out, dims=dims, coords=coords, name="reconstruction")

    def sample(self, n_samples=1, random_state=None):
        """Decode ``n_samples`` draws from the standard normal prior.

        Args:
            n_samples: number of microstructures (>= 1).
            random_state: None or an int seed for the draws.

        Returns:
            numpy ``(n_samples, *spatial)`` or ``(n_samples, *spatial, n_state)``.
        """
        check_is_fitted(self)
        n_samples = _check_int("n_samples", n_samples, 1)
        latent = int(self.model_.config["latent_dim"])
        z = np.random.default_rng(random_state).standard_normal((n_samples, latent))
        return self.inverse_transform(z)

    def get_feature_names_out(self, input_features=None):
        """``["vae0", "vae1", ...]``, one name per latent dimension.

        Args:
            input_features: ignored (the inputs are fields, not named columns).

        Returns:
            numpy array of str.
        """
        check_is_fitted(self)
        return np.asarray([f"vae{i}" for i in range(int(self.model_.config["latent_dim"]))], dtype=object)

    # ------------------------------------------------------------------ persistence
    def __getstate__(self):
        state = dict(super().__getstate__())  # a copy: object.__getstate__ hands out the live __dict__
        model = state.pop("model_", None)
        if model is not None:
            # Bytes of a plain state_dict: unpickled with weights_only=True, cheap to ship to dask workers.
            state["_model_state"] = {"config": dict(model.config), "state": _state_bytes(model)}
        return state

    def __setstate__(self, state):
        state = dict(state)
        packed = state.pop("_model_state", None)
        super().__setstate__(state)
        if packed is not None:
            self.model_ = _model_from_bytes(packed["config"], packed["state"])

    def _fitted_json(self):
        return {"input_shape_": list(self.input_shape_), "n_state_": self.n_state_, "stats_scale_": self.stats_scale_,
                "spatial_shape_": list(self.spatial_shape_), "correlations_": _jsonable(self.correlations_),
                "cutoff_": self.cutoff_, "spatial_dims_": _jsonable(getattr(self, "spatial_dims_", None)),
                "history_": _jsonable(self.history_)}

    def save(self, path):
        """Write the fitted transformer to ``path`` (atomically) in a ``weights_only``-loadable format.

        Args:
            path: file path (conventionally ``*.pt``).

        Returns:
            the path.
        """
        check_is_fitted(self)
        params = self.get_params()
        if not (params["random_state"] is None or isinstance(params["random_state"], numbers.Integral)):
            params["random_state"] = None  # a RandomState object is not part of a portable checkpoint
        return _write_checkpoint(path, params, self._fitted_json(), self.model_)

    @classmethod
    def load(cls, path):
        """Read a transformer written by :meth:`save` (``torch.load(..., weights_only=True)``).

        Args:
            path: file path.

        Returns:
            a fitted :class:`VAETransformer`.
        """
        params, fitted, model = _read_checkpoint(path)
        if isinstance(params.get("correlations"), list):
            params["correlations"] = tuple(tuple(p) for p in params["correlations"])
        est = cls(**params)
        est.model_ = model
        est.input_shape_ = tuple(fitted["input_shape_"])
        est.n_state_ = fitted["n_state_"]
        # checkpoints written before 3D support hold 2D shapes only and no pairs
        est.spatial_shape_ = tuple(fitted.get("spatial_shape_") or cls._spatial_of(est.input_shape_, est.n_state_))
        pairs = fitted.get("correlations_")
        est.correlations_ = None if pairs is None else [tuple(p) for p in pairs]
        est.history_ = fitted["history_"]
        est.stats_scale_ = fitted["stats_scale_"]
        est.cutoff_ = fitted.get("cutoff_")
        dims = fitted.get("spatial_dims_")
        est.spatial_dims_ = None if dims is None else tuple(dims)
        return est

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.non_deterministic = False
        tags.input_tags.three_d_array = True
        tags.transformer_tags.preserves_dtype = ["float64"]
        return tags
