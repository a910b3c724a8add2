"""fedavg.py against references written out by hand: float64 sums and the update rules of Reddi et al. 2021."""

import io
import math
import random

import pytest
import torch

import fedavg

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def make_state(seed, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    state = {A_KEY: torch.randn(4, 16, generator=g), B_KEY: torch.randn(16, 4, generator=g)}
    return {k: (scale * t).to(device, dtype) for k, t in state.items()}


def clone(state):
    return {k: t.clone() for k, t in state.items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].device == b[k].device, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- weighted_average


@pytest.mark.parametrize("weights", [[3, 1, 6], [0.2, 0.0, 0.5], [1e-3, 2e-3, 5e-3]])
def test_weighted_average_matches_float64_sum(weights):
    states = [make_state(i) for i in range(3)]
    out = fedavg.weighted_average(states, weights)
    for k in states[0]:
        ref = sum(w * s[k].double() for w, s in zip(weights, states, strict=True)) / sum(weights)
        torch.testing.assert_close(out[k].double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_identical_states_come_back_bit_exact(dtype):
    state = make_state(0, dtype, scale=100.0)
    out = fedavg.weighted_average([clone(state) for _ in range(4)], [1, 2, 3, 7])
    assert_states_equal(out, state)


def test_single_state_and_lone_nonzero_weight_return_that_state():
    state = make_state(0)
    assert_states_equal(fedavg.weighted_average([state], [5]), state)
    assert_states_equal(fedavg.weighted_average([make_state(1), state, make_state(2)], [0, 3, 0]), state)


def test_returns_new_tensors_and_does_not_touch_inputs():
    states = [make_state(i) for i in range(3)]
    before = [clone(s) for s in states]
    out = fedavg.weighted_average(states, [1, 1, 1])
    for s, b in zip(states, before, strict=True):
        assert_states_equal(s, b)
    single = fedavg.weighted_average(states[:1], [1])
    single[A_KEY].add_(1.0)
    assert torch.equal(states[0][A_KEY], before[0][A_KEY])
    assert out[A_KEY].data_ptr() != states[0][A_KEY].data_ptr()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtype_and_device_preserved(dtype, device):
    states = [make_state(i, dtype, device) for i in range(3)]
    out = fedavg.weighted_average(states, [1, 2, 3])
    for t in out.values():
        assert t.dtype == dtype and t.device.type == device


def test_bf16_states_are_summed_in_fp32_and_rounded_once():
    # 64 bf16 states with values in [1, 2): the exact mean lies in [1, 2), where a bf16 ulp is 2^-7.
    g = torch.Generator().manual_seed(0)
    states = [{"w": (1 + torch.rand(4096, generator=g)).bfloat16()} for _ in range(64)]
    weights = [1.0 + i % 5 for i in range(64)]
    exact = sum(w * s["w"].double() for w, s in zip(weights, states, strict=True)) / sum(weights)
    out = fedavg.weighted_average(states, weights)["w"]
    assert out.dtype == torch.bfloat16
    err = (out.double() - exact).abs().max().item()
    assert err <= 2**-8 + 1e-6  # half an ulp: correct rounding of the fp32-accurate mean
    naive = torch.zeros(4096, dtype=torch.bfloat16)  # what summing in bf16 would give
    for w, s in zip(weights, states, strict=True):
        naive = naive + (w / sum(weights)) * s["w"]
    assert (naive.double() - exact).abs().max().item() > 2 * err


def test_lora_factor_average_identity_from_docstring():
    # sum_k p_k B_k A_k = B_avg A_avg + sum_k p_k (B_k - B_avg)(A_k - A_avg); exact when A is shared.
    states = [clone(make_state(i, torch.float64)) for i in range(3)]
    weights = [2.0, 5.0, 3.0]
    p = [w / sum(weights) for w in weights]
    avg = fedavg.weighted_average(states, weights)
    A, B = avg[A_KEY], avg[B_KEY]
    mean_of_products = sum(pk * s[B_KEY] @ s[A_KEY] for pk, s in zip(p, states, strict=True))
    covariance = sum(pk * (s[B_KEY] - B) @ (s[A_KEY] - A) for pk, s in zip(p, states, strict=True))
    assert (B @ A - mean_of_products).abs().max() > 1e-2  # the product of averages is off...
    torch.testing.assert_close(B @ A + covariance, mean_of_products)  # ...by exactly the covariance
    for s in states:
        s[A_KEY] = states[0][A_KEY].clone()  # FFA-LoRA: one A for all clients
    avg = fedavg.weighted_average(states, weights)
    torch.testing.assert_close(
        avg[B_KEY] @ avg[A_KEY], sum(pk * s[B_KEY] @ s[A_KEY] for pk, s in zip(p, states, strict=True))
    )


@pytest.mark.parametrize(
    "states,weights,match",
    [
        ([], [], "at least one state"),
        ([{}], [], "1 states but 0 weights"),
        ([{}, {}], [1.0], "2 states but 1 weights"),
        ([{}, {}], [1.0, -1.0], "weight 1 is -1.0"),
        ([{}, {}], [1.0, float("nan")], "weight 1 is nan"),
        ([{}, {}], [float("inf"), 1.0], "weight 0 is inf"),
        ([{}, {}], [0, 0], "all weights are zero"),
    ],
)
def test_bad_weights_raise(states, weights, match):
    with pytest.raises(ValueError, match=match):
        fedavg.weighted_average(states, weights)


def test_differing_keys_shapes_dtypes_raise_naming_the_key():
    base = make_state(0)
    missing = {A_KEY: base[A_KEY]}
    with pytest.raises(ValueError, match=rf"state 2 is missing key '{B_KEY}'"):
        fedavg.weighted_average([base, base, missing], [1, 1, 1])
    extra = {**base, "extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"state 1 has an extra key 'extra.weight'"):
        fedavg.weighted_average([base, extra], [1, 1])
    shape = {**base, B_KEY: torch.zeros(16, 8)}
    with pytest.raises(ValueError, match=rf"key '{B_KEY}' has shape \(16, 8\) in state 1 but \(16, 4\)"):
        fedavg.weighted_average([base, shape], [1, 1])
    dtype = {**base, A_KEY: base[A_KEY].bfloat16()}
    with pytest.raises(ValueError, match=rf"key '{A_KEY}' has dtype torch.bfloat16 in state 1"):
        fedavg.weighted_average([base, dtype], [1, 1])
    ints = {"steps": torch.tensor([3])}
    with pytest.raises(ValueError, match="key 'steps' in state 0 is torch.int64"):
        fedavg.weighted_average([ints, ints], [1, 1])


# ---------------------------------------------------------------- sample_clients

CLIENTS = [f"client{i:03d}" for i in range(100)]


def test_sample_clients_is_deterministic_and_ignores_global_rng():
    random.seed(1)
    torch.manual_seed(1)
    first = fedavg.sample_clients(CLIENTS, round=3, seed=7, count=10)
    random.seed(2)
    torch.manual_seed(2)
    random.random()
    assert fedavg.sample_clients(CLIENTS, round=3, seed=7, count=10) == first


def test_sample_clients_differs_across_rounds_and_seeds():
    per_round = {tuple(fedavg.sample_clients(CLIENTS, round=r, seed=0, count=10)) for r in range(5)}
    assert len(per_round) == 5
    per_seed = {tuple(fedavg.sample_clients(CLIENTS, round=0, seed=s, count=10)) for s in range(5)}
    assert len(per_seed) == 5


def test_sample_clients_returns_a_subset_in_original_order():
    clients = CLIENTS[::-1]  # not sorted: the order must be the caller's, not alphabetical
    chosen = fedavg.sample_clients(clients, round=0, seed=0, count=30)
    assert len(chosen) == len(set(chosen)) == 30
    positions = [clients.index(c) for c in chosen]
    assert positions == sorted(positions)


@pytest.mark.parametrize(
    "n,fraction,expected",
    [
        (10, 0.3, 3),
        (10, 0.01, 1),
        (10, 1.0, 10),
        (10, 0.25, 2),
        (10, 0.35, 4),
        (100, 0.1, 10),
        (1, 0.5, 1),
    ],
)
def test_sample_clients_fraction(n, fraction, expected):
    chosen = fedavg.sample_clients(CLIENTS[:n], round=1, seed=0, fraction=fraction)
    assert len(chosen) == expected  # max(1, round(fraction * n)); round(2.5) == 2 (halves to even)
    if fraction == 1.0:
        assert chosen == CLIENTS[:n]


@pytest.mark.parametrize("count", [1, 4, 10])
def test_sample_clients_count(count):
    assert len(fedavg.sample_clients(CLIENTS[:10], round=1, seed=0, count=count)) == count


@pytest.mark.parametrize(
    "clients,kwargs,match",
    [
        ([], dict(count=1), "no clients"),
        (["a", "b", "a"], dict(count=1), "unique"),
        (["a", "b"], dict(), "exactly one of fraction or count"),
        (["a", "b"], dict(fraction=0.5, count=1), "exactly one of fraction or count"),
        (["a", "b"], dict(fraction=0.0), "fraction must be in"),
        (["a", "b"], dict(fraction=1.5), "fraction must be in"),
        (["a", "b"], dict(fraction=float("nan")), "fraction must be in"),
        (["a", "b"], dict(count=0), r"count must be an integer in \[1, 2\]"),
        (["a", "b"], dict(count=3), r"count must be an integer in \[1, 2\]"),
        (["a", "b"], dict(count=1.0), "count must be an integer"),
        (["a", "b"], dict(count=1, round=1.5), "round must be an integer"),
        (["a", "b"], dict(count=1, seed="0"), "seed must be an integer"),
    ],
)
def test_sample_clients_bad_arguments_raise(clients, kwargs, match):
    kwargs = {"round": 0, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        fedavg.sample_clients(clients, **kwargs)


# ---------------------------------------------------------------- state_bytes


def test_state_bytes():
    state = {
        "a": torch.zeros(3, 4),
        "b": torch.zeros(5, dtype=torch.bfloat16),
        "c": torch.zeros(2, 2, dtype=torch.float64),
        "d": torch.zeros(0),
    }
    assert fedavg.state_bytes(state) == 3 * 4 * 4 + 5 * 2 + 2 * 2 * 8
    assert fedavg.state_bytes({}) == 0


# ---------------------------------------------------------------- ServerOptimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fedavg_lr1_returns_the_average_exactly(dtype):
    opt = fedavg.ServerOptimizer("fedavg", lr=1.0)
    for r in range(3):
        # very different scales: global - (global - average) would not round back to the average
        global_state, average = make_state(2 * r, dtype, scale=1e3), make_state(2 * r + 1, dtype, scale=1e-3)
        assert_states_equal(opt.step(global_state, average), average)


def test_fedavg_with_server_lr():
    g, avg = make_state(0), make_state(1)
    new = fedavg.ServerOptimizer("fedavg", lr=0.5).step(g, avg)
    for k in g:
        torch.testing.assert_close(new[k].double(), g[k].double() - 0.5 * (g[k].double() - avg[k].double()))


def reference_run(kind, globals_, averages, lr, momentum=0.9, b1=0.9, b2=0.99, eps=1e-3):
    """Reddi et al. 2021, Algorithm 2 (and FedAvgM), one float64 element at a time, in their sign convention:
    Delta = average - x, x <- x + lr * (update)."""
    outs = []
    m, v = {}, {}
    for g, avg in zip(globals_, averages, strict=True):
        out = {}
        for k in g:
            flat_x, flat_a = g[k].double().flatten().tolist(), avg[k].double().flatten().tolist()
            mk, vk = m.get(k, [0.0] * len(flat_x)), v.get(k, [0.0] * len(flat_x))
            new = []
            for j, (x, a) in enumerate(zip(flat_x, flat_a, strict=True)):
                step = a - x
                if kind == "fedavgm":
                    mk[j] = momentum * mk[j] - step
                    new.append(x - lr * mk[j])
                else:
                    mk[j] = b1 * mk[j] + (1 - b1) * step
                    vk[j] = b2 * vk[j] + (1 - b2) * step * step
                    new.append(x + lr * mk[j] / (math.sqrt(vk[j]) + eps))
            m[k], v[k] = mk, vk
            out[k] = torch.tensor(new, dtype=torch.float64).reshape(g[k].shape)
        outs.append(out)
    return outs


@pytest.mark.parametrize(
    "kind,kwargs",
    [
        ("fedavgm", dict(lr=0.7, momentum=0.9)),
        ("fedadam", dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)),
        ("fedadam", dict(lr=0.03, beta1=0.5, beta2=0.9, eps=1e-2)),
    ],
)
def test_server_optimizers_match_reference_over_three_steps(kind, kwargs):
    # the global state fed to each step is the previous step's output, as in a real run
    averages = [make_state(10 + r) for r in range(3)]
    opt = fedavg.ServerOptimizer(kind, **kwargs)
    ref_kwargs = {
        "lr": kwargs["lr"],
        "momentum": kwargs.get("momentum", 0.9),
        "b1": kwargs.get("beta1", 0.9),
        "b2": kwargs.get("beta2", 0.99),
        "eps": kwargs.get("eps", 1e-3),
    }
    globals_ = [make_state(0)]
    for avg in averages:
        globals_.append(opt.step(globals_[-1], avg))
    refs = reference_run(kind, globals_[:-1], averages, **ref_kwargs)
    for out, ref in zip(globals_[1:], refs, strict=True):
        for k in out:
            torch.testing.assert_close(out[k].double(), ref[k], rtol=1e-5, atol=1e-5)
    assert opt.steps == 3


@pytest.mark.parametrize("kind", fedavg.KINDS)
def test_step_does_not_mutate_inputs_and_keeps_dtype(kind):
    opt = fedavg.ServerOptimizer(kind, lr=0.5)
    for r in range(2):
        g, avg = make_state(2 * r, torch.bfloat16), make_state(2 * r + 1, torch.bfloat16)
        g0, avg0 = clone(g), clone(avg)
        new = opt.step(g, avg)
        assert_states_equal(g, g0)
        assert_states_equal(avg, avg0)
        assert all(t.dtype == torch.bfloat16 for t in new.values())


@pytest.mark.parametrize("kind", fedavg.KINDS)
def test_state_dict_round_trip_resumes_exactly(kind):
    opt = fedavg.ServerOptimizer(kind, lr=0.05, momentum=0.8, beta1=0.7, beta2=0.95, eps=1e-2)
    g = make_state(0)
    for r in range(2):
        g = opt.step(g, make_state(1 + r))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)  # through a checkpoint file, as federated.py would
    buffer.seek(0)
    resumed = fedavg.ServerOptimizer(kind)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert (resumed.lr, resumed.momentum, resumed.beta1, resumed.beta2, resumed.eps, resumed.steps) == (
        0.05,
        0.8,
        0.7,
        0.95,
        1e-2,
        2,
    )
    for r in range(2, 4):
        avg = make_state(1 + r)
        a, b = opt.step(g, avg), resumed.step(g, avg)
        assert_states_equal(a, b)
        g = a


def test_state_dict_is_a_copy():
    opt = fedavg.ServerOptimizer("fedadam")
    opt.step(make_state(0), make_state(1))
    saved = opt.state_dict()
    m = saved["m"][A_KEY].clone()
    opt.step(make_state(2), make_state(3))
    assert torch.equal(saved["m"][A_KEY], m)


def test_load_state_dict_rejects_another_kind():
    with pytest.raises(ValueError, match="'fedavgm' server optimizer, not 'fedadam'"):
        fedavg.ServerOptimizer("fedadam").load_state_dict(fedavg.ServerOptimizer("fedavgm").state_dict())


def test_step_rejects_mismatched_states_and_buffers():
    opt = fedavg.ServerOptimizer("fedavgm")
    with pytest.raises(ValueError, match=rf"the average is missing key '{B_KEY}'"):
        opt.step(make_state(0), {A_KEY: make_state(1)[A_KEY]})
    assert opt.steps == 0
    opt.step(make_state(0), make_state(1))
    with pytest.raises(ValueError, match="buffers hold other keys"):
        opt.step({"other": torch.zeros(2)}, {"other": torch.ones(2)})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="sgd"), "unknown server optimizer kind 'sgd'"),
        (dict(lr=0.0), "lr must be"),
        (dict(lr=-1.0), "lr must be"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
        (dict(momentum=-0.1), "momentum must be in"),
        (dict(beta1=1.0), "beta1 must be in"),
        (dict(beta2=1.5), "beta2 must be in"),
        (dict(eps=0.0), "eps must be"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fedavg.ServerOptimizer(**kwargs)


# ---------------------------------------------------------------- client-level DP (DP-FedAvg)


def random_state(seed, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": (torch.randn(4, 16, generator=g) * scale).to(dtype),
            "a.lora_B": (torch.randn(8, 4, generator=g) * scale).to(dtype)}  # fmt: skip


def flat(state):
    return torch.cat([t.double().flatten() for t in state.values()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_update_bounds_the_global_norm_and_keeps_what_is_inside(dtype):
    ref = random_state(0, dtype=dtype)
    far = {k: ref[k] + d for k, d in random_state(1, scale=3.0, dtype=dtype).items()}
    clipped, norm = fedavg.clip_update(far, ref, 1.5)
    delta, before = flat(clipped) - flat(ref), flat(far) - flat(ref)
    assert norm == pytest.approx(before.norm().item(), rel=1e-9) and norm > 1.5
    rounding = 1e-6 if dtype == torch.float32 else 1e-2 * flat(ref).abs().max().item()  # of ref + delta
    assert delta.norm().item() <= 1.5 + rounding  # one norm over every tensor together
    assert torch.nn.functional.cosine_similarity(delta, before, dim=0) > 0.999  # the direction kept
    near = {k: ref[k] + 0.01 * d for k, d in random_state(2, dtype=dtype).items()}
    same, norm = fedavg.clip_update(near, ref, 1.5)
    assert norm < 1.5 and all(torch.equal(same[k], near[k]) and same[k].dtype == dtype for k in near)


def test_dp_mean_without_noise_is_the_fixed_denominator_mean():
    """Equal weights and the expected count m as the denominator, not the number of uploads."""
    ref = random_state(0)
    uploads = [fedavg.clip_update({k: ref[k] + d for k, d in random_state(i, 0.1).items()}, ref, 1.0)[0]
               for i in (1, 2, 3)]  # fmt: skip
    out = fedavg.dp_mean(ref, uploads, 1.0, 0.0, 5.0, torch.Generator().manual_seed(0))
    for k in ref:
        expected = ref[k].double() + sum(u[k].double() - ref[k].double() for u in uploads) / 5
        torch.testing.assert_close(out[k].double(), expected, rtol=0, atol=1e-6)
    empty = fedavg.dp_mean(ref, [], 1.0, 0.0, 5.0, torch.Generator())
    assert all(torch.equal(empty[k], ref[k]) for k in ref)  # a round that sampled no client


def test_dp_mean_noise_has_the_calibrated_std_and_follows_the_seed():
    """N(0, (z S / m)^2) per coordinate: measured over 40,000 coordinates x 25 draws."""
    ref = {"w": torch.zeros(200, 200)}
    z, s, m = 1.3, 0.5, 4.0
    draws = [fedavg.dp_mean(ref, [], s, z, m, torch.Generator().manual_seed(i))["w"] for i in range(25)]
    noise = torch.stack(draws).double()
    assert noise.std().item() == pytest.approx(z * s / m, rel=0.01)
    assert abs(noise.mean().item()) < 0.01 * z * s / m
    again = fedavg.dp_mean(ref, [], s, z, m, torch.Generator().manual_seed(3))["w"]
    assert torch.equal(again, draws[3]) and not torch.equal(draws[3], draws[4])
    # a state read back from a file may list its keys in another order: the same noise on the same key
    two = random_state(0)
    a = fedavg.dp_mean(two, [], s, z, m, torch.Generator().manual_seed(1))
    b = fedavg.dp_mean(dict(reversed(two.items())), [], s, z, m, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[k], b[k]) for k in two)


def test_dp_mean_refuses_an_unclipped_upload():
    ref = random_state(0)
    far = {k: ref[k] + d for k, d in random_state(1, scale=3.0).items()}
    with pytest.raises(ValueError, match="upload 0 is .* more than the clipping norm 1.0"):
        fedavg.dp_mean(ref, [far], 1.0, 1.0, 2.0, torch.Generator())


def test_poisson_sampling_rate_and_reproducibility():
    clients = [f"c{i}" for i in range(50)]
    rounds = [fedavg.poisson_sample(clients, r, seed=7, rate=0.1) for r in range(400)]
    assert rounds == [fedavg.poisson_sample(clients, r, seed=7, rate=0.1) for r in range(400)]
    n = sum(map(len, rounds))
    expected, sd = 400 * 50 * 0.1, math.sqrt(400 * 50 * 0.1 * 0.9)
    assert abs(n - expected) < 4 * sd  # each client independently with probability 0.1
    assert all(r == sorted(r, key=clients.index) for r in rounds)  # in the clients' order
    assert [] in [fedavg.poisson_sample(clients[:3], r, 0, 0.1) for r in range(50)]  # empty rounds happen
    assert fedavg.poisson_sample(clients, 1, 0, 1.0) == clients


def test_dp_epsilon_equals_the_rdp_accountant_used_directly():
    dp_accounting = pytest.importorskip("dp_accounting")
    for q, z, rounds, delta in [(0.01, 4.0, 10_000, 1e-5), (0.1, 1.0, 100, 1e-5), (1.0, 5.0, 12, 1e-3)]:
        accountant = dp_accounting.rdp.RdpAccountant()
        mechanism = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        accountant.compose(dp_accounting.SelfComposedDpEvent(mechanism, rounds))
        assert fedavg.dp_epsilon(q, z, rounds, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)
    # more noise, fewer rounds or a smaller sampling rate spend less
    assert fedavg.dp_epsilon(0.01, 4.0, 1000, 1e-5) < fedavg.dp_epsilon(0.01, 4.0, 10_000, 1e-5)
    assert fedavg.dp_epsilon(0.01, 8.0, 1000, 1e-5) < fedavg.dp_epsilon(0.01, 4.0, 1000, 1e-5)


def test_dp_accounting_matches_a_published_figure():
    """Bu, Dong, Long and Su, "Deep Learning with Gaussian Differential Privacy" (Harvard Data Science Review,
    2020), Figure 4: DP-SGD on MNIST with sampling rate 256/60000 is (1.34, 1e-5)-DP after 20 epochs at noise
    1.3 and (8.68, 1e-5)-DP after 70 epochs at noise 0.7 by the moments accountant. That accountant turned
    the RDP curve into epsilon with the classic bound min_a RDP(a) + log(1/delta) / (a - 1) over its orders;
    the same curve from dp-accounting, converted that way, gives those figures, and dp_epsilon, which uses
    dp-accounting's tighter conversion, gives less."""
    dp_accounting = pytest.importorskip("dp_accounting")
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))  # TensorFlow Privacy's of the time
    q = 256 / 60000
    for z, epochs, published in [(1.3, 20, 1.34), (0.7, 70, 8.68)]:
        steps = int(epochs * 60000 / 256)
        accountant = dp_accounting.rdp.RdpAccountant(orders)
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        rdp = accountant._rdp  # the RDP curve, one value per order (dp-accounting 0.6)
        classic = min(r + math.log(1e5) / (a - 1) for r, a in zip(rdp, orders, strict=True))
        assert classic == pytest.approx(published, abs=0.011)  # measured 1.350 and 8.678
        assert fedavg.dp_epsilon(q, z, steps, 1e-5) < classic  # 1.106 and 7.839
