"""OrthoAdam: equals AdamW in the rotated frame, differs from AdamW in the original one, checkpoints exactly."""
import copy
import io

import pytest
import torch

from ds_orthoadam import OrthoAdam
from ds_orthoadam.orthoadam import OrthoAdamConfigError, OrthoAdamStateError
from ds_orthoadam.rotations import ScratchBuffers, make_rotation, rotation_nbytes

SHAPES = {"blocks.0.weight": (6, 10), "blocks.0.bias": (6,), "conv.weight": (4, 3, 2, 2), "gain": (), "emb": (40, 5)}
GROUPS = [  # several param groups with their own hyper-parameters (weight decay on matrices only)
    {"names": ["blocks.0.weight", "conv.weight"], "weight_decay": 0.1},
    {"names": ["blocks.0.bias", "gain"], "weight_decay": 0.0, "lr": 0.02},
    {"names": ["emb"], "weight_decay": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
]


def make_params(dtype=torch.float64) -> dict[str, torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return {n: torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype)) for n, s in SHAPES.items()}


def gradient_stream(steps: int, dtype=torch.float64) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{n: torch.randn(s, generator=generator, dtype=dtype) for n, s in SHAPES.items()} for _ in range(steps)]


def groups_of(params, named: bool) -> list[dict]:
    out = []
    for group in GROUPS:
        entries = [(n, params[n]) if named else params[n] for n in group["names"]]
        out.append({"params": entries, **{k: v for k, v in group.items() if k != "names"}})
    return out


def rotation_keys(named: bool) -> dict[str, str]:
    """The documented key rule: the name, or "param{i}" with i the position across the param groups."""
    order = [n for group in GROUPS for n in group["names"]]
    return {n: (n if named else f"param{i}") for i, n in enumerate(order)}


def run(optimizer, params, grads):
    for step_grads in grads:
        for name, parameter in params.items():
            parameter.grad = step_grads[name].clone()
        optimizer.step()


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("kind,max_dense_dim,long_axis", [
    ("dense", 4096, "hadamard"), ("hadamard", 4096, "hadamard"), ("dense", 8, "hadamard"), ("hadamard", 8, "identity")])
def test_orthoadam_equals_adamw_on_rotated_parameters(kind, max_dense_dim, long_axis, named):
    """N steps of OrthoAdam on theta == N steps of AdamW on phi = Q theta fed Q g, mapped back with Q^T."""
    steps, seed = 12, 5
    params = make_params()
    keys = rotation_keys(named)
    rotations = {n: make_rotation(SHAPES[n], kind, seed, keys[n], max_dense_dim, dtype=torch.float64,
                                  long_axis=long_axis) for n in SHAPES}
    rotated = {n: torch.nn.Parameter(rotations[n].rotate(p.detach())) for n, p in params.items()}
    grads = gradient_stream(steps)

    ortho = OrthoAdam(groups_of(params, named), lr=0.05, rotation=kind, seed=seed, max_dense_dim=max_dense_dim,
                      long_axis=long_axis)
    run(ortho, params, grads)
    adamw = torch.optim.AdamW(groups_of(rotated, named=False), lr=0.05, foreach=False)
    run(adamw, rotated, [{n: rotations[n].rotate(g[n]) for n in g} for g in grads])

    for name, parameter in params.items():
        mapped_back = rotations[name].unrotate(rotated[name].detach())
        torch.testing.assert_close(parameter.detach(), mapped_back, rtol=0, atol=1e-6)
        assert (parameter.detach() - make_params()[name].detach()).abs().max() > 1e-3  # it really moved


def test_step_without_scratch_buffers_as_on_accelerators_is_identical(monkeypatch):
    """Accelerators get no scratch buffers (rotations allocate): the other code path must compute the same step."""
    params, grads = make_params(), gradient_stream(3)
    run(OrthoAdam(groups_of(params, True), lr=0.05, rotation="hadamard"), params, grads)
    monkeypatch.setattr(ScratchBuffers, "get", lambda self, numel, device, dtype: None)
    allocating = make_params()
    run(OrthoAdam(groups_of(allocating, True), lr=0.05, rotation="hadamard"), allocating, grads)
    for name in params:
        torch.testing.assert_close(allocating[name].detach(), params[name].detach(), rtol=0, atol=1e-12)


def test_orthoadam_differs_from_adamw_on_the_same_gradients():
    """Negative control: with a mixing rotation the trajectory is not Adam's."""
    params_ortho, params_adamw = make_params(), make_params()
    grads = gradient_stream(10)
    run(OrthoAdam(groups_of(params_ortho, True), lr=0.05), params_ortho, grads)
    run(torch.optim.AdamW(groups_of(params_adamw, False), lr=0.05), params_adamw, grads)
    for name in ("blocks.0.weight", "blocks.0.bias", "conv.weight", "emb"):
        difference = (params_ortho[name] - params_adamw[name]).abs().max()
        assert difference > 1e-2, (name, difference)
    # A scalar has nothing to mix with: there OrthoAdam is AdamW.
    torch.testing.assert_close(params_ortho["gain"], params_adamw["gain"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["dense", "hadamard"])
def test_gradient_on_one_coordinate_gives_a_non_axis_aligned_update(kind):
    """Adam moves only the coordinate that gets gradient; OrthoAdam spreads the update over the whole matrix."""
    weight = torch.nn.Parameter(torch.zeros(8, 12, dtype=torch.float64))
    reference = torch.nn.Parameter(torch.zeros(8, 12, dtype=torch.float64))
    ortho = OrthoAdam([("w", weight)], lr=0.01, rotation=kind)
    adamw = torch.optim.AdamW([reference], lr=0.01, weight_decay=0.0)
    for step in range(5):
        gradient = torch.zeros(8, 12, dtype=torch.float64)
        gradient[2, 3] = 1.0 + step
        weight.grad, reference.grad = gradient.clone(), gradient.clone()
        ortho.step()
        adamw.step()
    assert (reference.detach() != 0).sum() == 1
    moved = weight.detach().abs() > 1e-9
    assert moved.sum() >= 0.9 * weight.numel(), moved.sum()
    assert weight.detach().abs().max() < 0.9 * weight.detach().abs().sum() / 2  # not concentrated on one entry


@pytest.mark.parametrize("kind", ["dense", "hadamard"])
def test_state_dict_round_trip_continues_bit_identically(kind):
    params = make_params(torch.float32)
    grads = gradient_stream(8, torch.float32)
    optimizer = OrthoAdam(groups_of(params, True), lr=0.01, rotation=kind, seed=3, max_dense_dim=8,
                          long_axis="identity")
    run(optimizer, params, grads[:4])
    buffer = io.BytesIO()
    torch.save({"params": {n: p.detach().clone() for n, p in params.items()}, "optim": optimizer.state_dict()}, buffer)
    run(optimizer, params, grads[4:])

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    restored = {n: torch.nn.Parameter(p) for n, p in checkpoint["params"].items()}
    # A fresh optimiser built with other settings: the checkpoint's rotation settings must win.
    resumed = OrthoAdam(groups_of(restored, True), lr=0.01, rotation="hadamard" if kind == "dense" else "dense")
    resumed.load_state_dict(checkpoint["optim"])
    run(resumed, restored, grads[4:])
    for name in params:
        assert torch.equal(params[name].detach(), restored[name].detach()), name


def test_loading_onto_other_shapes_fails_clearly():
    params = make_params()
    optimizer = OrthoAdam(groups_of(params, True))
    run(optimizer, params, gradient_stream(1))
    other = make_params()
    other["emb"] = torch.nn.Parameter(torch.zeros(41, 5, dtype=torch.float64))
    target = OrthoAdam(groups_of(other, True))
    with pytest.raises(OrthoAdamStateError, match=r"\(emb\) has exp_avg of shape \(40, 5\) but the parameter has "
                                                  r"shape \(41, 5\)"):
        target.load_state_dict(optimizer.state_dict())
    state = copy.deepcopy(optimizer.state_dict())
    state["param_groups"][0]["params"].append(99)
    with pytest.raises(OrthoAdamStateError, match="holds 6 parameters but this optimiser has 5"):
        OrthoAdam(groups_of(make_params(), True)).load_state_dict(state)


def resume_in_a_new_optimiser(reference, params, edit_state=None, **resumed_kwargs) -> OrthoAdam:
    """Two steps of ``reference``, its (edited) state dict loaded into a new optimiser on copies of the parameters,
    two more steps of both: the parameters must agree bit for bit. Returns the new optimiser."""
    grads = gradient_stream(4)
    run(reference, params, grads[:2])
    state = copy.deepcopy(reference.state_dict())
    if edit_state is not None:
        edit_state(state)
    restored = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    resumed = OrthoAdam(groups_of(restored, True), **resumed_kwargs)
    resumed.load_state_dict(state)
    run(reference, params, grads[2:])
    run(resumed, restored, grads[2:])
    for name in params:
        assert torch.equal(params[name].detach(), restored[name].detach()), name
    return resumed


def test_a_state_dict_from_before_long_axis_existed_resumes_with_hadamard_long_axes():
    def drop_long_axis(state):
        for group in state["param_groups"]:
            del group["long_axis"]

    params = make_params()
    reference = OrthoAdam(groups_of(params, True), lr=0.01, rotation="dense", max_dense_dim=8)
    resume_in_a_new_optimiser(reference, params, drop_long_axis, lr=0.01, long_axis="identity")


def test_a_state_dict_from_before_max_rotated_dim_existed_resumes_rotating_every_axis():
    """Such a run rotated every axis: it goes on that way whatever the new optimiser was built with."""
    def drop_max_rotated_dim(state):
        for group in state["param_groups"]:
            del group["max_rotated_dim"]

    params = make_params()
    reference = OrthoAdam(groups_of(params, True), lr=0.01, rotation="hadamard", max_rotated_dim=None)
    with pytest.warns(RuntimeWarning, match="written before max_rotated_dim existed, with every axis rotated"):
        resumed = resume_in_a_new_optimiser(reference, params, drop_max_rotated_dim, lr=0.01, rotation="hadamard",
                                            max_rotated_dim=8)
    assert all(group["max_rotated_dim"] is None for group in resumed.param_groups)


def test_a_state_dict_without_names_resumes_in_its_param_i_frame_in_a_named_optimiser():
    """Rotations are keyed by name or by "param{i}": a run saved without names goes on with "param{i}" keys."""
    params = make_params()
    reference = OrthoAdam(groups_of(params, False), lr=0.01, rotation="hadamard")
    resumed = resume_in_a_new_optimiser(reference, params, lr=0.01, rotation="hadamard")
    assert [key for _, _, key in resumed.parameter_keys()] == [f"param{i}" for i in range(len(SHAPES))]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_resume_bit_identically_with_float32_moments(dtype):
    params = make_params(dtype)
    grads = gradient_stream(4, dtype)
    reference = OrthoAdam(groups_of(params, True), lr=0.01, rotation="hadamard")
    run(reference, params, grads[:2])
    state = torch.load(io.BytesIO(_saved(reference.state_dict())))
    restored = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    resumed = OrthoAdam(groups_of(restored, True), lr=0.01, rotation="hadamard")
    resumed.load_state_dict(state)
    assert all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in resumed.state.values())
    run(reference, params, grads[2:])
    run(resumed, restored, grads[2:])
    for name in params:
        assert torch.equal(params[name].detach(), restored[name].detach()), name


def _saved(state_dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("shape", [(0, 8), (0,), (3, 0, 2)])
def test_empty_parameters_step_like_adamw(shape):
    ortho, plain = torch.nn.Parameter(torch.ones(shape)), torch.nn.Parameter(torch.ones(shape))
    for parameter, optimizer in ((ortho, OrthoAdam([ortho], rotation="hadamard")),
                                 (plain, torch.optim.AdamW([plain], weight_decay=0.0))):
        parameter.grad = torch.ones(shape)
        optimizer.step()
    assert ortho.shape == plain.shape == shape


def one_step_update(shape: tuple[int, int], row: int, **kwargs) -> torch.Tensor:
    """The update of one OrthoAdam step (hadamard) on a zero parameter whose gradient is one random row."""
    parameter = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    parameter.grad = torch.zeros_like(parameter)
    parameter.grad[row] = torch.randn(shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    OrthoAdam([("embed", parameter)], lr=1.0, rotation="hadamard", **kwargs).step()
    return parameter.detach()


def test_by_default_a_gradient_on_one_token_row_updates_only_that_row():
    """The vocabulary axis (32000 > max_rotated_dim) stays unrotated: Adam's per-token normalisation is kept, while
    the row itself moves off its coordinate axes (the hidden axis is rotated, so it is not Adam's sign step)."""
    update = one_step_update((32000, 16), row=123)
    moved_rows = (update.abs() > 1e-12).any(dim=1).nonzero().flatten().tolist()
    assert moved_rows == [123]
    adam_step = -torch.sign(torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert (update[123] - adam_step).abs().max() > 0.1
    # Control: rotating every axis spreads the same gradient over many rows.
    spread = one_step_update((32000, 16), row=123, max_rotated_dim=None)
    assert (spread.abs() > 1e-12).any(dim=1).sum() > 1000


def test_by_default_the_widest_mlp_axis_of_the_model_zoo_is_rotated():
    """llama-1.4b's MLP axis (5461) is below max_rotated_dim: a gradient on one row spreads over the whole axis."""
    update = one_step_update((5461, 8), row=7)
    assert (update.abs() > 1e-12).any(dim=1).sum() > 5461 // 2


@pytest.mark.parametrize("version", [0, 3, None])
def test_loading_a_state_dict_from_an_unknown_rotation_scheme_fails_clearly(version):
    params = make_params()
    optimizer = OrthoAdam(groups_of(params, True))
    run(optimizer, params, gradient_stream(1))
    state = optimizer.state_dict()
    state["param_groups"][1]["rotation_version"] = version
    with pytest.raises(OrthoAdamStateError, match=f"rotation scheme version {version} is not one this ds_orthoadam "
                       r"builds \(1, 2\): resume with the release that wrote it"):
        OrthoAdam(groups_of(make_params(), True)).load_state_dict(state)


def test_a_version_1_state_dict_resumes_in_the_version_1_frame():
    """A run started before rotation scheme 2 goes on with its own Q after loading into a new optimiser."""
    params = make_params()
    reference = OrthoAdam([{**group, "rotation_version": 1} for group in groups_of(params, True)], lr=0.01,
                          rotation="hadamard")
    with pytest.warns(RuntimeWarning, match="rotation scheme version 1: this run goes on with it"):
        resumed = resume_in_a_new_optimiser(reference, params, lr=0.01, rotation="hadamard")
    # ...and that frame is version 1's, which differs from version 2's where an axis has an odd part (6 = 3 * 2).
    group, parameter, key = next(e for e in resumed.parameter_keys() if e[2] == "blocks.0.weight")
    x = torch.randn(6, 10, dtype=torch.float64)
    version_1 = make_rotation((6, 10), "hadamard", key=key, dtype=torch.float64, version=1)
    torch.testing.assert_close(resumed.rotation_for(group, parameter, key).rotate(x), version_1.rotate(x),
                               rtol=0, atol=1e-12)
    assert (version_1.rotate(x) - make_rotation((6, 10), "hadamard", key=key, dtype=torch.float64).rotate(x)
            ).abs().max() > 1e-3


@pytest.mark.parametrize("kwargs,message", [
    ({"lr": -1e-3}, "invalid learning rate lr=-0.001"),
    ({"betas": (1.0, 0.999)}, r"invalid betas\[0\]=1.0: betas must lie in \[0, 1\)"),
    ({"betas": (0.9, -0.1)}, r"invalid betas\[1\]=-0.1"),
    ({"eps": -1.0}, "invalid eps"),
    ({"weight_decay": -0.1}, "invalid weight_decay"),
    ({"rotation": "signed_permutation"}, "unknown rotation kind 'signed_permutation': choose one of dense, hadamard"),
    ({"max_dense_dim": 0}, "invalid max_dense_dim=0"),
    ({"seed": 1.5}, "invalid seed=1.5"),
    ({"long_axis": "none"}, "unknown long_axis transform 'none': choose one of hadamard, identity"),
    ({"max_rotated_dim": 0}, r"invalid max_rotated_dim=0: use an int >= 1 .* or None \(rotate every axis\)"),
    ({"max_rotated_dim": "all"}, "invalid max_rotated_dim='all'"),
    ({"max_rotated_dim": True}, "invalid max_rotated_dim=True"),
])
def test_bad_hyper_parameters_fail_clearly(kwargs, message):
    with pytest.raises(OrthoAdamConfigError, match=message):
        OrthoAdam([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    with pytest.raises(OrthoAdamConfigError, match=message):  # the same check for a per-group override
        OrthoAdam([{"params": [torch.nn.Parameter(torch.zeros(3))]}, {"params": [torch.nn.Parameter(torch.zeros(2))],
                                                                       **kwargs}])


def test_rotation_memory_report_matches_the_rotations_module():
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.LayerNorm(24), torch.nn.Linear(24, 7))
    for kind in ("dense", "hadamard"):
        optimizer = OrthoAdam(model.named_parameters(), rotation=kind, seed=2)
        assert optimizer.rotation_nbytes() == rotation_nbytes(model.named_parameters(), kind, seed=2)
    assert OrthoAdam(model.named_parameters()).rotation_nbytes() == 4 * (24**2 + 16**2 + 3 * 24**2 + 7**2 + 24**2
                                                                        + 7**2)


def test_trains_a_bfloat16_model_with_float32_moments():
    """Plain PyTorch loop: least squares on a bf16 linear layer; moments are float32, the loss falls."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(64, 16), torch.randn(64, 4)
    model = torch.nn.Linear(16, 4).to(torch.bfloat16)
    optimizer = OrthoAdam(model.named_parameters(), lr=0.02, rotation="hadamard")
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs.bfloat16()).float(), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert optimizer.state[model.weight]["exp_avg"].dtype == torch.float32
    assert model.weight.dtype == torch.bfloat16
    assert losses[-1] < 0.75 * losses[0]


def test_parameters_without_gradients_are_skipped():
    params = make_params()
    optimizer = OrthoAdam(groups_of(params, True), lr=0.1)
    before = params["gain"].detach().clone()
    params["emb"].grad = torch.ones(40, 5, dtype=torch.float64)
    optimizer.step()
    assert torch.equal(params["gain"].detach(), before) and params["gain"] not in optimizer.state
    assert optimizer.state[params["emb"]]["step"] == 1
