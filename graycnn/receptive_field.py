"""Receptive fields by gradient ascent in input space, every filter of a layer at once.

The study (its Figures 3-7) started from noise and climbed the gradient of one filter's
mean activation, one filter at a time. Here image i of a batch climbs the objective of
filter `filters[i]`, so a whole layer is one compiled program. Because BatchNorm runs in
inference mode, image i's objective depends on image i alone; the gradient of the sum
of the objectives w.r.t. image i is therefore that objective's own gradient, and the
RMS normalization is taken per image, so the batched run equals one-at-a-time runs.

Objectives:
    mean     the study's: the filter's mean activation over all positions.
    center   the activation at the center position, the receptive field proper.
    kernel   no ascent: the first layer's kernels themselves, (F, kh, kw, C). The first
             layer is linear, so `mean` has a gradient that does not depend on the input
             (flat colors plus border effects); `center` and `kernel` are exact there.

Example:
    >>> config = ModelConfig("densenet_seed")
    >>> model, variables = build_model(config), init_variables(config, jax.random.key(0))
    >>> compute_receptive_fields(model, variables, 2, image_shape=(32, 32, 3)).shape
    (18, 32, 32, 3)
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import dm_pix
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from graycnn import nnx_adapter
from graycnn.fields.options import LOOPS as LOOPS  # re-exported: the CLI's choices
from graycnn.fields.options import OBJECTIVES as OBJECTIVES
from graycnn.fields.options import check_filters, check_fit, check_options, renamed_image_shape
from graycnn.graph import capture
from graycnn.graph.trace import check_finite
from graycnn.layers import LayerRef, conv_layers, resolve_layer
from graycnn.tree import tree_get

# A conv's input gradient inside lax.fori_loop runs many times slower on CPU than in a
# Python loop over a jitted step (BUILD_NOTES.md, receptive_field); on accelerators the
# loop keeps the whole ascent on the device with no per-step dispatch.
_DEFAULT_LOOP = {"cpu": "python"}
# The per-device memory bound of a chunk. On CPU the time per image grew by half once a
# chunk's activations outgrew the cache, so chunks stay cache-sized there.
_DEFAULT_MEMORY = {"cpu": 8 * 2**20}
_ACCELERATOR_MEMORY = 2**30
_RMS_EPSILON = 1e-5  # the study's (Keras example's) gradient normalization


@dataclasses.dataclass(frozen=True)
class ReceptiveFields:
    """The result of `gradient_ascent` for one layer.

    Attributes:
        fields: (F, H, W, C) float32 in [0, 1], the deprocessed images.
        images: (F, H, W, C) float32, the raw images in 0-255 pixel space.
        objective: (F,) float32, each filter's objective at its final image (NaN for
            `kernel`).
        filters: (F,) int, the filter index of each row.
        path: The conv's module path.
        chunk_size: Images per compiled batch (0 for `kernel`).
        loop: 'python' or 'fori' ('' for `kernel`).
    """

    fields: np.ndarray
    images: np.ndarray
    objective: np.ndarray
    filters: np.ndarray
    path: str
    chunk_size: int = 0
    loop: str = ""


def compute_receptive_fields(
    model: nn.Module, variables: Any, layer: LayerRef, **options: Any
) -> np.ndarray:
    """One image per filter that maximizes that filter's response, deprocessed: (F, H, W, C)
    float32 in [0, 1], or (F, kh, kw, C) for objective='kernel'. Arguments as for
    `gradient_ascent`, which also returns the raw images and the objective values."""
    return gradient_ascent(model, variables, layer, **options).fields


def gradient_ascent(
    model: nn.Module,
    variables: Any,
    layer: LayerRef,
    *,
    objective: str = "mean",
    steps: int = 100,
    step_size: float = 0.5,
    seed: int = 0,
    noise_scale: float = 20.0,
    noise_offset: float = 128.0,
    jitter: int = 0,
    blur_sigma: float = 0.0,
    tv_weight: float = 0.0,
    image_shape: Sequence[int] | None = None,
    filters: Sequence[int] | None = None,
    chunk_size: int | None = None,
    memory_bytes: int | None = None,
    devices: Sequence[jax.Device] | None = None,
    loop: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    input_shape: Sequence[int] | None = None,
) -> ReceptiveFields:
    """Gradient ascent on the input of every filter of a conv layer, batched and jitted.

    Each step adds `step_size * g / (rms(g) + 1e-5)` to each image, g being the gradient
    of its filter's objective and rms taken over that image alone. Filter f starts from
    `uniform(key_f) * noise_scale + noise_offset`, key_f = fold_in(key(seed), f), so a
    filter's image does not depend on the chunking or the number of devices.

    Args:
        model: The Flax model, linen or NNX; `variables` its {'params', 'batch_stats'},
            or for an nnx.Module an nnx.State or None (its own state).
        layer: A 1-based conv layer number or a conv path (see graycnn.layers).
        objective: 'mean' (the study's), 'center' or 'kernel' (first layer only).
        steps, step_size: The ascent (the study: 100 steps of 0.5); steps in
            0..2**31-1, step_size > 0 (the numbers' rules: `check_options`).
        seed: Same seed, same images; 0..2**31-1.
        noise_scale, noise_offset: The start (the study: uniform x 20 + 128).
        jitter: Regularizer: shift each image by up to this many pixels (random, per
            image and step, wrapping around) before taking the gradient; 0..max(H, W).
        blur_sigma: Regularizer: Gaussian blur of this sigma (pixels) after each step;
            in [0, max(H, W)].
        tv_weight: Regularizer: subtract this times the mean absolute difference of
            neighboring pixels from each objective.
        image_shape: (H, W, C) of the images the model takes (required). `input_shape`,
            its old name, is accepted with a DeprecationWarning: elsewhere in graycnn
            input_shape is (N, H, W, C).
        filters: Which filters (default all), in the order of the result's rows; at
            least one.
        chunk_size: Images per compiled batch; default the most that fit
            `memory_bytes` per device (a rough activation count). Rounded up to a
            multiple of the device count.
        memory_bytes: The per-device bound used when chunk_size is None; default 8 MiB
            on CPU (cache-sized), 1 GiB on accelerators.
        devices: The filters are sharded across these (default all devices).
        loop: 'python' (a jitted step per step), 'fori' (all steps in one program) or
            'auto' (python on CPU, fori elsewhere).
        progress: Called as progress(steps done, steps in all) over all chunks.

    Returns:
        ReceptiveFields with (F, H, W, C) fields and images.

    Raises:
        ValueError: one line naming the argument: an unknown option value or layer,
            'kernel' for a layer other than the first, a number out of its range (see
            `check_options`), empty `filters` or `devices`, variables holding NaN or inf
            (naming the leaf), an image_shape the model cannot run on with these
            variables (e.g. one its convs and pools reduce to nothing), or an ascent
            that diverged to NaN or inf (naming the layer and the filters).
    """
    options = check_options(
        image_shape=renamed_image_shape(image_shape, input_shape), objective=objective,
        loop=loop, steps=steps,
        step_size=step_size, seed=seed, noise_scale=noise_scale, noise_offset=noise_offset,
        jitter=jitter, blur_sigma=blur_sigma, tv_weight=tv_weight, chunk_size=chunk_size,
        memory_bytes=memory_bytes,
    )  # fmt: skip
    steps, step_size, seed = options["steps"], options["step_size"], options["seed"]
    noise_scale, noise_offset = options["noise_scale"], options["noise_offset"]
    jitter, blur_sigma, tv_weight = options["jitter"], options["blur_sigma"], options["tv_weight"]
    chunk_size, memory_bytes = options["chunk_size"], options["memory_bytes"]
    model, variables, _ = nnx_adapter.adapt(model, variables)
    h, w, c = options["image_shape"]
    check_finite(variables)
    check_fit(model, variables, (1, h, w, c))
    paths = conv_layers(model, (1, h, w, c))
    path = resolve_layer(layer, paths)
    num_filters = tree_get(variables["params"], f"{path}/kernel").shape[-1]
    chosen = (
        np.arange(num_filters) if filters is None else check_filters(filters, num_filters, path)
    )
    if objective == "kernel":
        if path != paths[0]:
            raise ValueError(
                f"objective 'kernel' needs the first layer ({paths[0]}), whose kernels "
                f"see the image; got {path}. Use 'mean' or 'center'."
            )
        kernels = np.asarray(kernel_fields(variables, path))[chosen]
        nan = np.full(len(chosen), np.nan, np.float32)
        return ReceptiveFields(np.asarray(deprocess(kernels)), kernels, nan, chosen, path)

    devices = tuple(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: give at least one device (or None for all)")
    platform = devices[0].platform
    if chunk_size is None:
        if memory_bytes is None:
            memory_bytes = _DEFAULT_MEMORY.get(platform, _ACCELERATOR_MEMORY)
        per_image = _bytes_per_image(model, path, (1, h, w, c))
        chunk_size = max(1, memory_bytes * len(devices) // per_image)
    # As few chunks as the bound allows, then as even as possible, split over devices.
    chunks = math.ceil(len(chosen) / chunk_size)
    chunk_size = math.ceil(math.ceil(len(chosen) / chunks) / len(devices)) * len(devices)
    loop = _DEFAULT_LOOP.get(platform, "fori") if loop == "auto" else loop
    regularizers = (("jitter", jitter), ("blur_sigma", blur_sigma), ("tv_weight", tv_weight))
    program = _program(
        model, path, devices, loop, int(steps) if loop == "fori" else 0, (h, w, c),
        (noise_scale, noise_offset), objective, step_size, regularizers,
    )  # fmt: skip
    images, values = _run_chunks(program, variables, chosen, chunk_size, seed, steps, progress)
    _check_converged(images, values, chosen, path, step_size, (noise_scale, noise_offset))
    return ReceptiveFields(
        np.asarray(deprocess(images)), images, values, chosen, path, chunk_size, loop
    )


def filter_objective(
    response: Callable[[Any, jax.Array], jax.Array],
    variables: Any,
    images: jax.Array,
    filters: jax.Array,
    objective: str = "mean",
) -> jax.Array:
    """The objective of image i for filter filters[i].

    Args:
        response: f(variables, images) -> conv output (N, H', W', F), e.g.
            `graycnn.layers.layer_output_fn(model, path)`.
        images: (N, H, W, C) in 0-255 pixel space.
        filters: (N,) int filter indices.
        objective: 'mean' over all positions or the 'center' position.

    Returns:
        (N,) float32.
    """
    out = response(variables, images)
    act = jnp.take_along_axis(out, filters[:, None, None, None], axis=-1)[..., 0]
    if objective == "mean":
        return act.mean(axis=(1, 2))
    if objective == "center":
        return act[:, act.shape[1] // 2, act.shape[2] // 2]
    raise ValueError(f"objective {objective!r} has no value; use 'mean' or 'center'")


def kernel_fields(variables: Any, path: str) -> jax.Array:
    """The kernels of a conv as images: (kh, kw, C, F) -> (F, kh, kw, C)."""
    return jnp.moveaxis(jnp.asarray(tree_get(variables["params"], f"{path}/kernel")), -1, 0)


def deprocess(images: ArrayLike) -> jax.Array:
    """The study's display transform, per image: zero mean, std 0.1, plus 0.5, clipped.
    (N, H, W, C) -> (N, H, W, C) float32 in [0, 1]."""
    x = jnp.asarray(images, jnp.float32)
    x = x - x.mean(axis=(1, 2, 3), keepdims=True)
    x = x / (x.std(axis=(1, 2, 3), keepdims=True) + 1e-5)
    return jnp.clip(x * 0.1 + 0.5, 0.0, 1.0)


def to_gray(fields: ArrayLike) -> jax.Array:
    """BT.601 luma (0.2989, 0.587, 0.114), as the study converted its fields.
    (N, H, W, 3) -> (N, H, W, 1), same range; (N, H, W, 1) is returned as is."""
    fields = jnp.asarray(fields, jnp.float32)
    if fields.ndim != 4 or fields.shape[-1] not in (1, 3):
        raise ValueError(f"fields must be (N, H, W, 1 or 3), got shape {fields.shape}")
    return fields if fields.shape[-1] == 1 else dm_pix.rgb_to_grayscale(fields, keep_dims=False)


class _Program(NamedTuple):
    init: Callable  # (key, filters) -> images
    run: Callable  # (variables, images, filters, key[, t]) -> images after step t / all
    value: Callable  # (variables, images, filters) -> objectives
    loop: str
    rows: NamedSharding
    replicated: NamedSharding


# Models are frozen dataclasses, hashable by value: a second call with the same layer and
# options reuses the compiled programs (the benchmark times that second call).
@functools.lru_cache(maxsize=16)
def _program(model, path, devices, loop, steps, shape, noise, objective, step_size, regularizers):
    mesh = Mesh(np.asarray(devices), ("filters",))
    rows, replicated = (
        NamedSharding(mesh, PartitionSpec("filters")),
        NamedSharding(mesh, PartitionSpec()),
    )
    response = capture.layer_output_fn(model, path)
    step = functools.partial(
        _ascent_step, response, objective=objective, step_size=step_size, **dict(regularizers)
    )
    init = jax.jit(lambda key, f: _initial_images(key, f, shape, *noise), out_shardings=rows)
    value = jax.jit(lambda v, x, f: filter_objective(response, v, x, f, objective))
    if loop == "python":
        run = jax.jit(step, out_shardings=rows)
    else:
        run = jax.jit(
            lambda v, x, f, k: jax.lax.fori_loop(0, steps, lambda t, x: step(v, x, f, k, t), x),
            out_shardings=rows,
        )
    return _Program(init, run, value, loop, rows, replicated)


def _ascent_step(
    response: Callable,
    variables: Any,
    images: jax.Array,
    filters: jax.Array,
    key: jax.Array,
    t: jax.Array,
    *,
    objective: str,
    step_size: float,
    jitter: int,
    blur_sigma: float,
    tv_weight: float,
) -> jax.Array:
    """One step for every image: (N, H, W, C) -> (N, H, W, C)."""
    keys = jax.vmap(lambda f: jax.random.fold_in(jax.random.fold_in(key, f), t + 1))(filters)

    def total(x):
        if jitter:
            shifts = jax.vmap(lambda k: jax.random.randint(k, (2,), -jitter, jitter + 1))(keys)
            x = jax.vmap(lambda image, s: jnp.roll(image, (s[0], s[1]), axis=(0, 1)))(x, shifts)
        value = filter_objective(response, variables, x, filters, objective)
        if tv_weight:
            tv = sum(jnp.abs(jnp.diff(x, axis=a)).mean((1, 2, 3)) for a in (1, 2))
            value = value - tv_weight * tv
        # A sum over images: BN in inference mode keeps image i's gradient its own.
        return value.sum()

    grads = jax.grad(total)(images)
    rms = jnp.sqrt(jnp.mean(jnp.square(grads), axis=(1, 2, 3), keepdims=True))
    images = images + step_size * grads / (rms + _RMS_EPSILON)
    if blur_sigma:
        size = 2 * math.ceil(2 * blur_sigma) + 1
        # Blurring the deviation from the mean keeps zero padding from darkening borders.
        mean = images.mean(axis=(1, 2), keepdims=True)
        images = mean + dm_pix.gaussian_blur(images - mean, blur_sigma, size)
    return images


def _initial_images(key: jax.Array, filters: jax.Array, shape, scale, offset) -> jax.Array:
    """Filter f's start depends on f alone, not on its chunk or device."""
    uniform = jax.vmap(lambda f: jax.random.uniform(jax.random.fold_in(key, f), shape))
    return uniform(filters) * scale + offset


@functools.lru_cache(maxsize=64)
def _bytes_per_image(model: nn.Module, path: str, shape: tuple[int, ...]) -> int:
    """A rough bound on the memory one image's ascent step needs at `path`.

    Sums the outputs of every module called up to the target conv (XLA drops the rest)
    and allows 4x for the values kept for the backward pass and their gradients.
    """
    return max(1, 4 * 4 * capture.elements_until(model, path, shape))


def _run_chunks(program, variables, filters, chunk_size, seed, steps, progress):
    """Runs `program` on `filters` in chunks; returns host (images, objective values)."""
    variables = jax.device_put(variables, program.replicated)
    key = jax.random.key(seed)
    chunks = math.ceil(len(filters) / chunk_size)
    padded = np.resize(filters, chunks * chunk_size)  # repeats filters; extra rows dropped
    images, values = [], []
    for start in range(0, len(padded), chunk_size):
        chunk = padded[start : start + chunk_size].astype(np.int32)
        f = jax.make_array_from_callback(chunk.shape, program.rows, lambda i, c=chunk: c[i])
        x = program.init(key, f)
        done = start // chunk_size * steps
        for t in range(steps) if program.loop == "python" else ():
            x = program.run(variables, x, f, key, np.int32(t))
            if progress is not None:
                x.block_until_ready()  # so the bar follows the device, not dispatch
                progress(done + t + 1, chunks * steps)
        if program.loop == "fori":
            x = program.run(variables, x, f, key)
            if progress is not None:
                x.block_until_ready()
                progress(done + steps, chunks * steps)
        images.append(_to_host(x))
        values.append(_to_host(program.value(variables, x, f)))
    return np.concatenate(images)[: len(filters)], np.concatenate(values)[: len(filters)]


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _check_converged(images, values, filters, path, step_size, noise) -> None:
    """Raises ValueError naming the layer and filters whose ascent reached NaN or inf."""
    finite = np.isfinite(images).all(axis=tuple(range(1, images.ndim))) & np.isfinite(values)
    if finite.all():
        return
    bad = filters[~finite].tolist()
    shown = ", ".join(map(str, bad[:20])) + (f" ... ({len(bad)} in all)" if len(bad) > 20 else "")
    # The start is named only where it was changed: the defaults never overflow.
    start = (
        ""
        if noise == (20.0, 128.0)
        else f", a smaller noise_scale or noise_offset (now {noise[0]:g}, {noise[1]:g})"
    )
    raise ValueError(
        f"the gradient ascent at layer {path} diverged to NaN or inf for filters {shown}; "
        f"use a smaller step_size (now {step_size:g}){start} or fewer steps"
    )
