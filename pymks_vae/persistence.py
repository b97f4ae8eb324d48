"""Persistence of a fitted :class:`~pymks_vae.vae_transformer.VAETransformer`.

- Model snapshots: the trained weights as the bytes of a plain ``state_dict`` plus the model
  config (:func:`_state_bytes`, :func:`_model_from_bytes`, :class:`_ModelSnapshot`). Pickles of a
  fitted transformer carry these bytes (reloaded with ``weights_only=True``), and lazy dask
  graphs ship one :class:`_ModelSnapshot` to the workers, which rebuild the model once per process.
- The checkpoint file written by ``VAETransformer.save`` and read by ``VAETransformer.load``
  (:func:`_write_checkpoint`, :func:`_read_checkpoint`): one ``torch.save`` dict, loadable with
  ``torch.load(..., weights_only=True)``, holding ``format`` (``"pymks_vae.VAETransformer"``),
  ``version`` (1), ``params_json`` (``get_params()``), ``fitted_json`` (the fitted attributes),
  ``model_config_json`` and ``state_dict``.

Example:
    >>> import torch
    >>> from pymks_vae.models import VAE
    >>> from pymks_vae.persistence import _ModelSnapshot, _state_bytes
    >>> model = VAE(latent_dim=2, image_size=(16, 16), channels=1).eval()
    >>> snapshot = _ModelSnapshot(model.config, _state_bytes(model))
    >>> x = torch.rand(1, 1, 16, 16)
    >>> torch.equal(snapshot.model().encode(x)[0], model.encode(x)[0])
    True
"""
import hashlib
import io
import json
import os
import tempfile

import numpy as np
import torch

_FORMAT = "pymks_vae.VAETransformer"
_FORMAT_VERSION = 1
_MODEL_CACHE = {}  # digest -> rebuilt torch module, one per process (dask workers reuse it)


def _state_bytes(model):
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def _build_model(config):
    from pymks_vae.models import VAE

    return VAE.from_config(config)


def _model_from_bytes(config, state):
    model = _build_model(config)
    model.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=True))
    return model.eval()


class _ModelSnapshot:
    """The trained weights as bytes plus the model config: small, picklable, tokenisable by dask.

    Shipped once per dask graph (as a delayed object) to the workers, which rebuild the model once
    per process and cache it by digest.
    """

    def __init__(self, config, state):
        self.config = dict(config)
        self.state = bytes(state)
        self.digest = hashlib.sha256(self.state + json.dumps(self.config, sort_keys=True).encode()).hexdigest()

    def __dask_tokenize__(self):
        return ("pymks_vae-model", self.digest)

    def model(self):
        model = _MODEL_CACHE.get(self.digest)
        if model is None:
            if len(_MODEL_CACHE) > 8:
                _MODEL_CACHE.clear()
            model = _MODEL_CACHE[self.digest] = _model_from_bytes(self.config, self.state)
        return model


def _write_checkpoint(path, params, fitted, model):
    """Write a checkpoint file atomically (a temporary file in the same directory, then renamed).

    Args:
        path: file path (conventionally ``*.pt``).
        params: the estimator's ``get_params()``, JSON-able after :func:`_jsonable`.
        fitted: the fitted attributes as a JSON-able dict.
        model: the trained :class:`pymks_vae.models.VAE`.

    Returns:
        the path.
    """
    payload = {
        "format": _FORMAT,
        "version": _FORMAT_VERSION,
        "params_json": json.dumps(_jsonable(params)),
        "fitted_json": json.dumps(fitted),
        "model_config_json": json.dumps(_jsonable(dict(model.config))),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _read_checkpoint(path):
    """Read a checkpoint file written by :func:`_write_checkpoint` (``weights_only=True``).

    Args:
        path: file path.

    Returns:
        ``(params, fitted, model)``: the parameters and fitted attributes as decoded from JSON and
        the rebuilt model (CPU, eval mode).

    Raises:
        ValueError: not a VAETransformer checkpoint, or an unsupported version.
    """
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a {_FORMAT} checkpoint")
    if payload.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {payload.get('version')!r}")
    params = json.loads(payload["params_json"])
    fitted = json.loads(payload["fitted_json"])
    model = _build_model(json.loads(payload["model_config_json"]))
    model.load_state_dict(payload["state_dict"])
    return params, fitted, model.eval()


def _jsonable(obj):
    """Tuples -> lists, numpy scalars -> Python, tensors -> lists: something json.dumps accepts."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "__dict__"):
        return _jsonable(vars(obj))
    return repr(obj)
