"""GradientCapture and GradientSet against torch.func references, and every error path."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradmetanet import CaptureError, GradientCapture, GradientSet, NetworkSpec, UnsupportedModuleError
from gradmetanet.models.mlp import make_mlp
from gradmetanet.testing import check_symmetry
from gradmetanet import spec_of


def per_example_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_kind: str) -> dict:
    """Gradients of each example's own loss, by ``vmap(grad(...))``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        if loss_kind == "mse":
            return F.mse_loss(out, yi.unsqueeze(0))
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), yi.unsqueeze(0).reshape(-1))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)


def batch_loss(out: torch.Tensor, y: torch.Tensor, loss_kind: str, reduction: str) -> torch.Tensor:
    """The batch loss whose per-example terms match :func:`per_example_reference`."""
    if loss_kind == "mse":
        per = (out - y).square().flatten(1).mean(1)
    else:
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
        per = per.reshape(out.shape[0], -1).mean(1)
    return per.mean() if reduction == "mean" else per.sum()


def random_case(seed: int):
    rng = random.Random(seed)
    depth = rng.randint(1, 5)
    sizes = [rng.choice([3, 5, 7, 9, 13]) for _ in range(depth + 1)]
    activation = rng.choice(["relu", "tanh", "sine", "relu_inplace"])
    bias = rng.random() < 0.7
    loss_kind = rng.choice(["mse", "ce"])
    reduction = rng.choice(["mean", "sum"])
    tokens = rng.choice([None, 1, 4])
    return sizes, activation, bias, loss_kind, reduction, tokens


CASES = [random_case(s) for s in range(24)] + [
    ([5, 7, 3], "relu_inplace", True, "ce", "mean", None),
    ([4, 9, 9, 2], "sine", False, "mse", "sum", 6),
    ([6, 11], "tanh", True, "mse", "mean", 3),
]


def make_batch(sizes, loss_kind, tokens, b=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (b,) if tokens is None else (b, tokens)
    x = torch.randn(*lead, sizes[0], generator=gen, dtype=torch.float64)
    if loss_kind == "mse":
        y = torch.randn(*lead, sizes[-1], generator=gen, dtype=torch.float64)
    else:
        y = torch.randint(sizes[-1], lead, generator=gen)
    return x, y


def capture(model, x, y, loss_kind, reduction):
    with GradientCapture(model, loss_reduction=reduction) as cap:
        batch_loss(model(x), y, loss_kind, reduction).backward()
    return cap.gradients


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-bias{c[2]}-{c[3]}-{c[4]}-T{c[5]}")
def test_per_example_grads_match_torch_func(case):
    sizes, activation, bias, loss_kind, reduction, tokens = case
    torch.manual_seed(len(sizes))
    model = make_mlp(sizes, activation, bias).double()
    x, y = make_batch(sizes, loss_kind, tokens)
    gs = capture(model, x, y, loss_kind, reduction)
    ref = per_example_reference(model, x, y, loss_kind)
    mine = gs.per_example_grads()
    assert mine.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=1e-10, rtol=0)
    # the batch gradient is exactly what backward accumulated
    for name, p in model.named_parameters():
        torch.testing.assert_close(gs.mean_grad()[name], p.grad, atol=1e-10, rtol=0)
    # the empirical Fisher diagonal equals the brute-force mean of squares
    for name, value in gs.empirical_fisher_diag().items():
        torch.testing.assert_close(value, ref[name].square().mean(0), atol=1e-10, rtol=0)
    # per-example norms from the factors (ghost norms for T > 1) equal the dense ones
    per_parameter = gs.norms(per_parameter=True)
    for name in ref:
        torch.testing.assert_close(per_parameter[name], ref[name].flatten(1).norm(dim=1), atol=1e-10, rtol=1e-10)
    total = torch.cat([ref[name].flatten(1) for name in ref], 1).norm(dim=1)
    torch.testing.assert_close(gs.norms(), total, atol=1e-10, rtol=1e-10)


def test_chunked_fisher_matches_brute_force(monkeypatch):
    import gradmetanet.capture.gradients as gradients_module
    monkeypatch.setattr(gradients_module, "_CHUNK_ELEMENTS", 7)   # many tiny chunks
    model = make_mlp([4, 5, 3], "tanh").double()
    x, y = make_batch([4, 5, 3], "mse", tokens=5, b=9)
    gs = capture(model, x, y, "mse", "mean")
    dense = gs.per_example_grads()
    for name, value in gs.empirical_fisher_diag().items():
        torch.testing.assert_close(value, dense[name].square().mean(0), atol=1e-12, rtol=0)


def test_spec_of_an_mlp():
    model = make_mlp([5, 7, 9, 3])
    spec = spec_of(model)
    assert [s.size for s in spec.spaces] == [5, 7, 9, 3]
    assert [s.permutable for s in spec.spaces] == [False, True, True, False]
    assert spec.fixed_neurons() == [0, 1, 2, 3, 4, 21, 22, 23]
    assert [(s.weight, s.bias) for s in spec.sites] == [("0.weight", "0.bias"), ("2.weight", "2.bias"),
                                                        ("4.weight", "4.bias")]
    assert dict(spec.param_shapes()) == {n: p.shape for n, p in model.named_parameters()}
    assert NetworkSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("activation", ["relu", "tanh", "sine"])
def test_capture_moves_with_every_group_element(activation):
    """Symmetry harness on the capture path: moving the parameters by an element of every space's group
    (ScalePerm for ReLU, SignPerm for tanh / sine) moves the captured factors by the same element;
    permuting an input neuron or a negative scale on a ReLU space is no symmetry and changes them."""
    sizes = [5, 7, 13, 7, 3]
    torch.manual_seed(0)
    model = make_mlp(sizes, activation).double()
    x, y = make_batch(sizes, "ce", None, b=8)
    spec = spec_of(model)
    assert {s.group.name for s in spec.spaces[1:-1]} == {"scale_perm" if activation == "relu" else "sign_perm"}

    def captured(params):
        net = make_mlp(sizes, activation).double()
        net.load_state_dict(params)
        return capture(net, x, y, "ce", "mean")

    def move_params(params, element, sp):
        return sp.transform_parameters(params, element)

    breakers = ("fixed", "negative_scale") if activation == "relu" else ("fixed",)
    params = model.state_dict()
    check_symmetry(spec, lambda p: model_output(sizes, activation, p, x), params, move_params,
                   lambda out, g, sp: out, sensitivity=breakers)
    check_symmetry(spec, captured, params, move_params, lambda gs, g, sp: gs.transform(g), sensitivity=breakers)


def model_output(sizes, activation, params, x):
    net = make_mlp(sizes, activation).double()
    net.load_state_dict(params)
    with torch.no_grad():
        return net(x)


def test_neuron_features_layout():
    torch.manual_seed(0)
    model = make_mlp([4, 6, 3], "relu").double()
    x, y = make_batch([4, 6, 3], "mse", None, b=5)
    gs = capture(model, x, y, "mse", "sum")
    feats = gs.neuron_features()
    assert {k: tuple(v.shape) for k, v in feats.items()} == {"s0": (5, 4, 2), "s1": (5, 6, 2), "s2": (5, 3, 2)}
    torch.testing.assert_close(feats["s0"][..., 0], x)
    assert torch.all(feats["s0"][..., 1] == 0)                    # documented edge slot
    torch.testing.assert_close(feats["s2"][..., 0], model(x).detach())  # network output
    torch.testing.assert_close(feats["s1"][..., 0], torch.relu(model[0](x)).detach())
    torch.testing.assert_close(feats["s2"][..., 1], 2 * (model(x) - y).detach() / 3)


def test_save_load_roundtrip(tmp_path):
    model = make_mlp([4, 7, 3], "sine").double()
    x, y = make_batch([4, 7, 3], "ce", 2)
    gs = capture(model, x, y, "ce", "mean")
    path = tmp_path / "grads.safetensors"
    gs.save(path)
    loaded = GradientSet.load(path)
    assert loaded.spec == gs.spec and loaded.loss_reduction == "mean"
    for name, value in gs.per_example_grads().items():
        torch.testing.assert_close(loaded.per_example_grads()[name], value, atol=0, rtol=0)
    assert loaded.to(torch.float32).dtype == torch.float32
    assert len(loaded.select(slice(0, 2))) == 2


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GradientSet file"):
        GradientSet.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        GradientSet.load(junk)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a saved GradientSet"):
        GradientSet.load(other)
    # a truncated file (a corrupted checkpoint) is reported, not half-read
    model = make_mlp([4, 7, 3]).double()
    x, y = make_batch([4, 7, 3], "ce", None)
    good = tmp_path / "good.safetensors"
    capture(model, x, y, "ce", "mean").save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        GradientSet.load(truncated)


def test_hooks_removed_on_exit_and_on_exception():
    model = make_mlp([3, 4, 2])
    x, y = make_batch([3, 4, 2], "ce", None)
    x = x.float()
    with GradientCapture(model) as cap:
        F.cross_entropy(model(x), y).backward()
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ZeroDivisionError):
        with GradientCapture(model):
            model(x)
            1 / 0
    assert all(not m._forward_hooks for m in model.modules())
    assert cap.gradients.batch_size == 6


def test_inplace_activation_does_not_corrupt_capture():
    torch.manual_seed(0)
    model = make_mlp([4, 9, 9, 3], "relu_inplace").double()
    reference = make_mlp([4, 9, 9, 3], "relu").double()
    reference.load_state_dict(model.state_dict())
    x, y = make_batch([4, 9, 9, 3], "ce", None)
    a = capture(model, x, y, "ce", "mean").per_example_grads()
    b = capture(reference, x, y, "ce", "mean").per_example_grads()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-12, rtol=0)


def test_weight_sharing_becomes_tokens():
    torch.manual_seed(0)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 5)
            self.mid = nn.Linear(5, 5)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            h = torch.tanh(self.mid(h))
            h = torch.tanh(self.mid(h))      # the same layer twice
            return self.out(h)

    model = Shared().double()
    x, y = make_batch([3, 2], "mse", None, b=4)
    gs = capture(model, x, y, "mse", "mean")
    assert gs.activations["mid"].shape == (4, 2, 5)
    # the data flow ties the shared layer's input and output: one tanh space, read and written by 'mid'
    mid = gs.spec.site("mid")
    assert mid.in_space == mid.out_space == gs.spec.site("inp").out_space
    assert gs.spec.space(mid.in_space).group.name == "sign_perm"
    params = {k: v.detach() for k, v in model.state_dict().items()}

    def output(p):
        with torch.no_grad():
            return functional_call(model, p, (x,))

    check_symmetry(gs.spec, output, params, lambda p, g, sp: sp.transform_parameters(p, g), lambda o, g, sp: o,
                   sensitivity=("fixed", "untie"))
    ref = per_example_reference(model, x, y, "mse")
    for name, value in gs.per_example_grads().items():
        torch.testing.assert_close(value, ref[name], atol=1e-10, rtol=0)


def test_subset_of_layers_and_unsupported_modules():
    model = nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(2, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(GroupNorm\)"):
        GradientCapture(model)
    x = torch.randn(5, 4)
    with GradientCapture(model, layers=["0", model[3]]) as cap:
        model(x).sum().backward()
    gs = cap.gradients
    assert [s.name for s in gs.spec.sites] == ["0", "3"]
    assert not any(s.permutable for s in gs.spec.spaces)
    for name in ("0.weight", "0.bias", "3.weight", "3.bias"):
        torch.testing.assert_close(gs.mean_grad()[name], model.get_parameter(name).grad)
    for bad in (nn.Sequential(nn.Conv3d(1, 2, 3)), nn.Sequential(nn.Linear(3, 4), nn.GRU(4, 2))):
        with pytest.raises(UnsupportedModuleError, match="Conv3d|GRU"):
            GradientCapture(bad)
    with pytest.raises(UnsupportedModuleError, match="no capturable layer"):
        GradientCapture(nn.Sequential(nn.ReLU()))
    with pytest.raises(CaptureError, match="no registered extractor"):
        GradientCapture(model, layers=["1"])
    with pytest.raises(ValueError, match=r"no layer 'fc9'; capturable layers: \['0', '3'\]"):
        GradientCapture(model, layers=["fc9"])
    with pytest.raises(UnsupportedModuleError, match="pass example_inputs"):
        spec_of(nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)))


def test_error_paths():
    model = make_mlp([3, 4, 2])
    x, y = torch.randn(5, 3), torch.randint(2, (5,))
    with pytest.raises(ValueError, match="loss_reduction"):
        GradientCapture(model, loss_reduction="avg")
    with pytest.raises(CaptureError, match="no_grad"):
        with GradientCapture(model), torch.no_grad():
            model(x)
    with pytest.raises(CaptureError, match="backward reached layer .* twice"):
        with GradientCapture(model):
            loss = F.cross_entropy(model(x), y)
            loss.backward(retain_graph=True)
            loss.backward()
    with pytest.raises(CaptureError, match="no backward pass"):
        with GradientCapture(model) as cap:
            model(x)
        cap.gradients
    with pytest.raises(CaptureError, match="forward after a backward"):
        with GradientCapture(model):
            F.cross_entropy(model(x), y).backward()
            model(x)
    with pytest.raises(CaptureError, match="modified in place"):
        with GradientCapture(model):
            xr = x.clone().requires_grad_(False)
            out = model[2](model[1](model[0](xr)))
            xr.add_(1.0)
            out.sum().backward()
    with pytest.raises(CaptureError, match="non-finite"):
        with GradientCapture(model) as cap:
            F.cross_entropy(model(x * float("nan")), y).backward()
        cap.gradients.mean_grad()
    with pytest.raises(CaptureError, match="batch axis"):
        with GradientCapture(model):
            model(torch.randn(3))
    frozen = make_mlp([3, 4, 2]).requires_grad_(False)
    with pytest.raises(CaptureError, match="does not require grad"):
        with GradientCapture(frozen):
            frozen(x)
    with pytest.raises(ValueError, match="output_grads must be"):
        spec = NetworkSpec.chain([3, 2])
        GradientSet(spec, {"0": torch.zeros(2, 1, 3)}, {"0": torch.zeros(2, 1, 4)})


def test_layer_off_the_loss_path_gets_zero_gradient():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x), self.b(x)

    model = TwoHeads()
    x = torch.randn(4, 3)
    with GradientCapture(model, layers=["a", "b"]) as cap:
        model(x)[0].sum().backward()
    assert torch.all(cap.gradients.output_grads["b"] == 0)


def test_float32_and_cuda_devices():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device, dtype in itertools.product(devices, [torch.float32, torch.float64]):
        torch.manual_seed(0)
        model = make_mlp([5, 8, 3], "tanh").to(device, dtype)
        x = torch.randn(7, 5, device=device, dtype=dtype)
        y = torch.randint(3, (7,), device=device)
        gs = capture(model, x, y, "ce", "mean")
        assert gs.dtype == dtype and gs.device.type == device
        ref = per_example_reference(model, x, y, "ce")
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        for name, value in gs.per_example_grads().items():
            torch.testing.assert_close(value, ref[name], atol=tol, rtol=tol)


def test_reset_starts_a_fresh_capture_with_the_same_hooks():
    torch.manual_seed(0)
    model = make_mlp([4, 5, 3], "tanh")
    batches = [(torch.randn(6, 4), torch.randint(3, (6,))) for _ in range(2)]
    with GradientCapture(model) as cap:
        for x, y in batches:
            cap.reset()
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        kept = cap.gradients
    with GradientCapture(model) as fresh:
        F.cross_entropy(model(batches[1][0]), batches[1][1]).backward()
    torch.testing.assert_close(kept.neuron_tensor(), fresh.gradients.neuron_tensor(), atol=0, rtol=0)
    torch.testing.assert_close(kept.neuron_tensor(), torch.cat(list(kept.neuron_features().values()), 1))
