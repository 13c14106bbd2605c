"""Jitted passes over images that capture layers' inputs and outputs (internal).

A module's input and output are captured (`graph.capture`, linen or NNX) while the whole
model runs; under jit, XLA drops everything after the last captured module, so a pass
costs the forward pass up to that module. Each pass runs the original model and the
current (merged, partly compensated) tree on the same batch and returns sums: per batch
in float32 on the devices, across batches in float64 on the host (`Passes.accumulate`).
Every pass runs on this process's first device, whatever the device count: sums split
over devices add in another order, and the solve amplifies that rounding (cond up to
5e4): refits split over two devices and run on one differed by 2e-5 in a weight, and
the default command's accuracies by 0.1-0.3 points on 1,000 images. On one device, any
layout of processes and devices fits the same weights.
A consumer's target y comes from the reference: the original model on the same batch,
or a `Teacher` (another model of the same consumers, on its own row-matched images).
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from graycnn.compensate.layer import HIGHEST, LayerSpec, apply_matrix, layer_spec, normal_equations
from graycnn.graph import capture
from graycnn.nnx_adapter import BATCHNORMS
from graycnn.training import parallel


@dataclasses.dataclass(frozen=True)
class Teacher:
    """Where a consumer's target outputs come from, if not the original model.

    Attributes:
        model: A flax module with the same consumer paths and output widths (e.g. the
            color model, whose first conv reads 3 channels).
        variables: Its variables.
        images: (N, ...) what it takes, row-matched to the images of the fit (e.g. the
            color images whose gray view the merged model sees).
    """

    model: nn.Module
    variables: Mapping[str, Any]
    images: np.ndarray


@dataclasses.dataclass
class Fit:
    """A consumer being refit.

    Attributes:
        spec: Its LayerSpec.
        kernel: (D, O) its merged kernel matrix; `bias` (O,) its merged bias (zeros if
            none): the 'before' of the errors.
        shift: (O,) subtracted from its outputs before they are summed and squared, so
            the spread sum (y - mean)^2 does not cancel in float32.
        target: (K, F) map of the original outputs to the merged ones, or None.
        summary: What the report says of the fit.
    """

    spec: LayerSpec
    kernel: np.ndarray
    bias: np.ndarray
    shift: np.ndarray
    target: np.ndarray | None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    def args(self) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(a, np.float32) for a in (self.kernel, self.bias, self.shift))


class Passes:
    """The passes of one compensation: the original model and variables are fixed, the
    current tree is set with `use`; jitted passes are cached per (kind, path).

    Every pass is fn(original vars, current vars, reference vars, batch, reference
    batch, mask, *args); the reference is the teacher where there is one, else the
    original model on the same batch.
    """

    def __init__(self, original, merged, original_variables, batch_size: int, teacher=None):
        # One device of this process (module docstring): each process fits on its own,
        # with no collective, and every layout gets the same sums.
        self._rows, self._replicated = parallel.mesh_shardings(jax.local_devices()[:1])
        self.original, self.merged, self.batch_size = original, merged, batch_size
        self.original_variables = jax.device_put(dict(original_variables), self._replicated)
        self.reference = original if teacher is None else teacher.model
        self.reference_variables = (
            self.original_variables
            if teacher is None
            else jax.device_put(dict(teacher.variables), self._replicated)
        )
        self.reference_images = None if teacher is None else teacher.images
        self.variables = None
        self._cache: dict[tuple[str, str], Callable] = {}

    def use(self, variables: Mapping[str, Any]) -> "Passes":
        self.variables = jax.device_put(dict(variables), self._replicated)
        return self

    def accumulate(
        self, fn: Callable, images: np.ndarray, *args: Any, batch_size: int | None = None
    ) -> Any:
        """Sums fn(original vars, current vars, reference vars, batch, reference batch,
        mask, *args) over batches of `batch_size` (default the run's) images, the last
        one padded with masked zeros. With a teacher, `images` are the fit's and the
        reference batch is cut from the teacher's row-matched images; else it is None
        (the batch itself, not copied to the device twice)."""
        size = batch_size or self.batch_size  # one device: no rounding to a device count
        total = None
        for start in range(0, len(images), size):
            batch, mask = jax.device_put(_padded(images[start : start + size], size), self._rows)
            ref = None
            if self.reference_images is not None:
                ref, _ = _padded(self.reference_images[start : start + size], size)
                ref = jax.device_put(ref, self._rows)
            variables = (self.original_variables, self.variables, self.reference_variables)
            out = fn(*variables, batch, ref, mask, *args)
            out = jax.tree.map(lambda a: np.asarray(a, np.float64), out)
            total = out if total is None else jax.tree.map(np.add, total, out)
        return total

    def gram_fn(self, path: str, fit: Fit) -> Callable:
        """Sums of a consumer's target y, of its residual y - P W_merged - b_merged, P^T P
        and P^T residual (P with a ones column for a bias)."""
        key = ("gram", path)
        if key not in self._cache:
            tap_r, tap_m = tap(self.reference, [path]), tap(self.merged, [path])

            def run(_, cur_vars, ref_vars, images, ref_images, mask, kernel, bias, shift):
                y = tap_r(ref_vars, images if ref_images is None else ref_images)[path][2]
                _, x, _ = tap_m(cur_vars, images)[path]
                return _sums(fit, y, x, None, mask, kernel, bias, shift)

            self._cache[key] = jax.jit(run)
        return self._cache[key]

    def errors(
        self, fits: Mapping[str, Fit], images: np.ndarray, batch_size: int
    ) -> dict[str, tuple[float, float]]:
        """{path: (before, after)}: sum (out - y)^2 / sum (y - mean y)^2 of each consumer
        on `images`, `out` from its merged kernel or from the current tree; one pass."""
        key = ("errors", ",".join(fits))
        if key not in self._cache:
            tap_r, tap_m = tap(self.reference, list(fits)), tap(self.merged, list(fits))

            def run(_, cur_vars, ref_vars, images, ref_images, mask, args):
                ys = tap_r(ref_vars, images if ref_images is None else ref_images)
                xs = tap_m(cur_vars, images)
                return {
                    p: _sums(fit, ys[p][2], xs[p][1], xs[p][2], mask, *args[p])
                    for p, fit in fits.items()
                }

            self._cache[key] = jax.jit(run)
        args = {p: fit.args() for p, fit in fits.items()}
        sums = self.accumulate(self._cache[key], images, args, batch_size=batch_size)
        out = {}
        for path, s in sums.items():
            spread = float(np.sum(s["sumsq"] - s["sum"] ** 2 / s["rows"]))
            if spread <= 0:  # a constant output: no variance to explain
                out[path] = (float("nan"), float("nan"))
            else:
                out[path] = (float(s["before"]) / spread, float(s["after"]) / spread)
        return out

    def batchnorm_fn(self, path: str) -> Callable:
        """Sums of a BatchNorm's input x - shift and its squares, per channel, in the
        original model and in the current tree."""
        key = ("batchnorm", path)
        if key in self._cache:
            return self._cache[key]
        tap_o, tap_m = tap(self.original, [path]), tap(self.merged, [path])

        def moments(x, mask, shift):
            x = x.reshape(-1, x.shape[-1]).astype(jnp.float32) - shift
            rows = jnp.repeat(mask, x.shape[0] // mask.shape[0])[:, None]
            return {
                "rows": jnp.sum(rows),
                "sum": jnp.sum(x * rows, 0),
                "sumsq": jnp.sum(x**2 * rows, 0),
            }

        def run(orig_vars, cur_vars, _, images, __, mask, shift_o, shift_m):
            x_o = tap_o(orig_vars, images)[path][1]
            x_m = tap_m(cur_vars, images)[path][1]
            return moments(x_o, mask, shift_o), moments(x_m, mask, shift_m)

        self._cache[key] = jax.jit(run)
        return self._cache[key]


def _padded(chunk: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(batch of `size` float32 rows: `chunk` then zeros, mask: 1 for `chunk`'s rows)."""
    chunk = np.asarray(chunk, np.float32)
    mask = (np.arange(size) < len(chunk)).astype(np.float32)
    pad = np.zeros((size - len(chunk), *chunk.shape[1:]), np.float32)
    return np.concatenate([chunk, pad]), mask


def _sums(fit: Fit, y, x, out, mask, kernel, bias, shift) -> dict[str, jax.Array]:
    """A consumer's sums on one batch: with its current output `out`, the squared error
    of out and of the merged kernel's; without, the Gram and cross products of the fit."""
    y = y.reshape(-1, y.shape[-1]).astype(jnp.float32)
    if fit.target is not None:
        y = jnp.matmul(y, jnp.asarray(fit.target.T, jnp.float32), precision=HIGHEST)
    x = x.astype(jnp.float32)
    merged = apply_matrix(x, kernel, fit.spec)
    rows = jnp.repeat(mask, merged.shape[0] // mask.shape[0])[:, None]
    residual = (y - merged - bias) * rows
    sums = {
        "rows": jnp.sum(rows),
        "sum": jnp.sum((y - shift) * rows, axis=0),
        "sumsq": jnp.sum((y - shift) ** 2 * rows, axis=0),
        "before": jnp.sum(residual**2),
    }
    if out is not None:
        out = out.reshape(-1, out.shape[-1]).astype(jnp.float32)
        return sums | {"after": jnp.sum((out - y) ** 2 * rows)}
    # A padding image's patches are zero rows: it adds nothing to the sums.
    gram, cross, ones = normal_equations(
        x * mask.reshape(-1, *[1] * (x.ndim - 1)), residual, fit.spec
    )
    if fit.spec.use_bias:  # P's ones column
        gram = jnp.block([[gram, ones[:, None]], [ones[None, :], sums["rows"].reshape(1, 1)]])
        cross = jnp.concatenate([cross, jnp.sum(residual, axis=0, keepdims=True)])
    return sums | {"gram": gram, "cross": cross}


def mean_var(sums: Mapping[str, np.ndarray], shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (biased) variance from `batchnorm_fn`'s sums of x - shift."""
    centered = sums["sum"] / sums["rows"]
    return shift + centered, np.maximum(sums["sumsq"] / sums["rows"] - centered**2, 0.0)


def tap(model: Any, paths: Sequence[str]) -> Callable:
    """f(variables, images) -> {path: (module, input, output)}, in call order, of the
    modules at `paths` (inference mode).

    The run stops once the last of them has returned (`probe`, on the whole run, has
    checked that each is called once).

    Raises:
        ValueError: a module is not called.
    """

    def run(variables, images):
        calls = _calls(model, variables, images, paths, stop=True)
        return {p: (c.module, c.input, c.output) for p, c in calls}

    return run


def probe(model, variables, input_shape, paths) -> tuple[dict[str, Any], dict[str, Any]]:
    """Shapes only: ({path: LayerSpec, or a BatchNorm's epsilon}, {path: (input, output)
    ShapeDtypeStructs}), both in the order the forward pass calls the modules.

    Raises:
        ValueError: naming the module: not called, called twice, not a flax Conv,
            Dense (nnx.Linear) or BatchNorm over the last axis.
    """
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    calls = _calls(model, variables, x, paths)
    info = {
        p: _batchnorm_epsilon(c.module, c.input, p)
        if isinstance(c.module, BATCHNORMS)
        else layer_spec(c.module, p)
        for p, c in calls
    }
    return info, {p: (c.input, c.output) for p, c in calls}


def _calls(
    model, variables, images, paths: Sequence[str], stop: bool = False
) -> list[tuple[str, Any]]:
    """The modules' calls; with `stop`, the run ends once the last has returned."""
    calls = capture.capture(model, variables, images, set(paths), stop=set(paths) if stop else None)
    for path, call in calls.items():
        if call.count > 1:
            raise ValueError(f"module {path!r} is called more than once per forward pass")
    missing = sorted(set(paths) - set(calls))
    if missing:
        raise ValueError(f"modules {missing} are not called by the model's forward pass")
    return list(calls.items())


def bytes_per_image(spec: LayerSpec, inputs: Any, outputs: Any) -> int:
    """float32 bytes one image takes in a consumer's pass, at most: its patches (twice),
    target, residual and output rows, and its input and output in both models."""
    rows = int(np.prod(outputs.shape[:-1])) // outputs.shape[0]
    if spec.kind == "dense":
        features = int(np.prod(inputs.shape[1:])) // rows
    else:
        features = inputs.shape[-1] * int(np.prod(spec.window))
    activations = (int(np.prod(inputs.shape)) + int(np.prod(outputs.shape))) // inputs.shape[0]
    return 4 * (rows * (2 * (features + 1) + 4 * outputs.shape[-1]) + 4 * activations)


def _batchnorm_epsilon(module: Any, x: Any, path: str) -> float:
    axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    if axis not in ((-1,), (x.ndim - 1,)):
        raise ValueError(f"BatchNorm {path!r} must normalize the last axis")
    return float(module.epsilon)
