"""JAX as a contender of `xpmlp bench` (the `peers` extra installs it): the same network,
its activation (ReLU or Sigmoid) and loss (softmax cross-entropy, or a Sigmoid output and
the Euclidean loss) and SGD, a whole epoch compiled by XLA into one call with
``lax.scan``.  The optimizer is optax ``add_decayed_weights`` then ``sgd(momentum)``:
v <- m*v + (g + wd*p); p <- p - lr*v, our update.  JAX is imported here only, and only
when the bench asks for it.
"""
import numpy as np


def jax_epoch(weights, x_host, y_host, batch, lr, momentum, weight_decay, activation="relu", loss="sce"):
    """(run_epoch(perm) -> (losses, accuracies) as NumPy, version), or None without JAX.

    ``weights``: [(W, b), ...] as NumPy arrays, the network's Linear layers in order,
    ``activation`` ("relu", "sigmoid") between them; ``loss``: "sce" or "mse" (1/(2N) sum
    ||sigmoid(out) - onehot||^2, as xpmlp's Euclidean networks).  Each call continues training from where the last one stopped."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return None
    dtype = x_host.dtype
    if dtype == np.float64:
        jax.config.update("jax_enable_x64", True)
    params = [(jnp.asarray(W, dtype=dtype), jnp.asarray(b, dtype=dtype)) for W, b in weights]
    optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum))
    x, y = jnp.asarray(x_host), jnp.asarray(y_host)

    act = {"relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid}[activation]

    def loss_and_accuracy(params, xb, yb):
        h = xb
        for k, (W, b) in enumerate(params):
            h = h @ W + b
            if k < len(params) - 1:
                h = act(h)
        if loss == "sce":
            log_prob = jax.nn.log_softmax(h)
            value = -jnp.mean(jnp.take_along_axis(log_prob, yb[:, None], axis=1))
        else:
            h = jax.nn.sigmoid(h)
            value = 0.5 * jnp.mean(jnp.sum((h - jax.nn.one_hot(yb, h.shape[1], dtype=dtype)) ** 2, axis=1))
        return value, jnp.mean((jnp.argmax(h, axis=1) == yb).astype(dtype))

    def step(carry, idx):
        params, opt_state = carry
        (loss, acc), grads = jax.value_and_grad(loss_and_accuracy, has_aux=True)(params, x[idx], y[idx])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), (loss, acc)

    @jax.jit
    def epoch(params, opt_state, perm):
        (params, opt_state), (losses, accs) = jax.lax.scan(step, (params, opt_state), perm.reshape(-1, batch))
        return params, opt_state, losses, accs

    state = [params, optimizer.init(params)]

    def run_epoch(perm):
        state[0], state[1], losses, accs = epoch(state[0], state[1], jnp.asarray(perm))
        return np.asarray(losses), np.asarray(accs)  # the once-per-epoch read, as ours

    return run_epoch, jax.__version__
