import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graycnn.models import ModelConfig, build_model, init_variables
from graycnn.training import parallel


# 8 rows per device in chunks of 2; 3 rows per device padded to one chunk of 4.
@pytest.mark.parametrize(("rows", "chunk"), [(16, 2), (6, 4)])
def test_map_in_chunks_is_the_function_on_the_whole_batch(rows, chunk):
    assert jax.device_count() == 2
    config = ModelConfig("densenet_test")
    model = build_model(config)
    variables = init_variables(config, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (rows, 32, 32, 3), maxval=255.0)
    seen = []

    def logits(v, images):
        seen.append(images.shape)
        return model.apply(v, images, train=False)

    batch_sharding, replicated = parallel.mesh_shardings()
    chunked = jax.jit(parallel.map_in_chunks(logits, chunk))
    got = chunked(jax.device_put(variables, replicated), jax.device_put(x, batch_sharding))
    assert seen == [(chunk, 32, 32, 3)]  # traced once, on one chunk
    assert got.shape == (rows, 10) and len(got.sharding.device_set) == 2
    want = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        parallel.map_in_chunks(logits, 0)
