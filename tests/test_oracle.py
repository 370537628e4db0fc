"""PyTorch as an independent oracle: the same ten networks, losses and SGD in torch float64.

Our ``Linear`` holds W as (in, out), so torch's weight is W.T.  CI installs torch
(the ``oracle`` extra); importorskip only spares a machine without it.
"""
import numpy as np
import pytest
from helpers import host

from xpmlp import MODELS, SGD, build_model

torch = pytest.importorskip("torch")
F = torch.nn.functional
torch.set_num_threads(1)   # see conftest.py: tiny matrices, and no fight with OpenBLAS threads

STEPS, BATCH = 20, 64
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
REL_TOL = 1e-10


def batches(seed=20):
    """A fixed sequence of MNIST-like batches: sparse pixels in [0, 1], ten classes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        x = np.where(rng.random((BATCH, 784)) < 0.2, rng.random((BATCH, 784)), 0.0)
        out.append((x, rng.integers(0, 10, size=BATCH)))
    return out


BATCHES = batches()


def torch_model(name, weights):
    """The torch twin of our network ``name`` holding our initial ``weights`` (W, b, W, b, ...)."""
    hidden, activation, loss = MODELS[name]
    modules = []
    for i in range(len(weights) // 2):
        W, b = weights[2 * i], weights[2 * i + 1]
        linear = torch.nn.Linear(*W.shape, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(W.T.copy()))
            linear.bias.copy_(torch.from_numpy(b))
        modules.append(linear)
        if i < len(hidden):
            modules.append(torch.nn.ReLU() if activation == "relu" else torch.nn.Sigmoid())
    if loss == "mse":
        modules.append(torch.nn.Sigmoid())
    return torch.nn.Sequential(*modules), loss


def torch_loss(kind, output, labels):
    if kind == "mse":   # Euclidean loss: 1/(2N) sum_n ||y_n - t_n||^2
        onehot = F.one_hot(labels, 10).to(output.dtype)
        return 0.5 * ((output - onehot) ** 2).sum() / output.shape[0]
    return F.cross_entropy(output, labels)


def rel_err(a, b):
    """max |a - b| / max |b|: the error relative to the array's magnitude."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("lr", [0.01, 0.1])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_matches_torch(backend, ops, name, lr):
    model = build_model(name, backend=backend, dtype="float64", seed=1, ops=ops)
    opt = SGD(model, lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    net, loss_kind = torch_model(name, [np.array(a) for a in model.state_arrays()])
    torch_opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY, dampening=0)
    f64 = backend.dtype("float64")

    ours_losses, torch_losses = [], []
    for step, (x, labels) in enumerate(BATCHES):
        out = model.forward(backend.asarray(x, dtype=f64))
        ours_losses.append(float(host(backend, model.loss.forward(out, backend.asarray(labels)))))
        model.backward(model.loss.backward())

        torch_opt.zero_grad()
        t_loss = torch_loss(loss_kind, net(torch.from_numpy(x)), torch.from_numpy(labels))
        t_loss.backward()
        torch_losses.append(t_loss.item())

        if step == 0:
            linears = [m for m in net if isinstance(m, torch.nn.Linear)]
            grads = [host(backend, getattr(layer, "grad_" + attr)) for layer, attr in model.parameters()]
            for i, linear in enumerate(linears):
                assert rel_err(grads[2 * i], linear.weight.grad.numpy().T) <= REL_TOL, f"grad W{i}"
                assert rel_err(grads[2 * i + 1], linear.bias.grad.numpy()) <= REL_TOL, f"grad b{i}"
        opt.step()
        torch_opt.step()

    np.testing.assert_allclose(ours_losses, torch_losses, rtol=REL_TOL)
    assert np.all(np.isfinite(ours_losses))
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    params = model.state_arrays()
    for i, linear in enumerate(linears):
        assert rel_err(params[2 * i], linear.weight.detach().numpy().T) <= REL_TOL, f"W{i}"
        assert rel_err(params[2 * i + 1], linear.bias.detach().numpy()) <= REL_TOL, f"b{i}"
    # The run moved the weights well away from their start, so the comparison means something.
    start = build_model(name, backend="numpy", dtype="float64", seed=1).state_arrays()
    assert rel_err(params[-2], start[-2]) > 1e-3


@pytest.mark.parametrize("name", ["mlp1-sigmoid-mse", "mlp2-relu-sce"])
def test_stacked_training_matches_separate_torch_models(backend, ops, name):
    """K = 3 stacked models, each with its own seed, init std, lr, momentum and weight decay,
    against three torch models with their own torch.optim.SGD, on shared batches."""
    seeds, stds = [1, 2, 3], [0.01, 0.1, 0.05]
    lrs, momenta, decays = [0.1, 0.01, 0.05], [0.9, 0.0, 0.5], [5e-4, 0.0, 1e-3]
    model = build_model(name, backend=backend, dtype="float64", seed=seeds, init_std=stds, stack=(3,), ops=ops)
    opt = SGD(model, lr=lrs, momentum=momenta, weight_decay=decays)
    start = [np.array(a) for a in model.state_arrays()]
    nets = [torch_model(name, [a[k].reshape(-1) if a.shape[1] == 1 else a[k] for a in start]) for k in range(3)]
    torch_opts = [torch.optim.SGD(net.parameters(), lr=lr, momentum=m, weight_decay=wd, dampening=0)
                  for (net, _), lr, m, wd in zip(nets, lrs, momenta, decays)]
    f64 = backend.dtype("float64")
    ours, theirs = [], []
    for x, labels in BATCHES:
        out = model.forward(backend.asarray(x, dtype=f64))
        ours.append(host(backend, model.loss.forward(out, backend.asarray(labels))))
        model.backward(model.loss.backward())
        opt.step()
        losses = []
        for (net, kind), torch_opt in zip(nets, torch_opts):
            torch_opt.zero_grad()
            loss = torch_loss(kind, net(torch.from_numpy(x)), torch.from_numpy(labels))
            loss.backward()
            torch_opt.step()
            losses.append(loss.item())
        theirs.append(losses)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=REL_TOL)
    params = model.state_arrays()
    for k, (net, _) in enumerate(nets):
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        for i, linear in enumerate(linears):
            assert rel_err(params[2 * i][k], linear.weight.detach().numpy().T) <= REL_TOL, f"model {k} W{i}"
            assert rel_err(params[2 * i + 1][k].reshape(-1), linear.bias.detach().numpy()) <= REL_TOL
        assert rel_err(params[-2][k], start[-2][k]) > 1e-3, "the weights moved"
