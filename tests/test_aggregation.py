"""federated.aggregation: ffa, fedsa and stack against the exact weighted mean of the clients' products
(a dense float64 formula), FedAvg's reported error against its float64 recomputation, and fedsa's uploads.
Each choice's resume is in test_federated.py, the Flower deployment in test_flower.py."""

import os

import pytest
import torch
from torch import nn

import bench
import client as fl_client
import config as C
import fedavg
import federated
import lora
import server as fl_server
from conftest import run_main
from test_federated import CONFIG, adapter_tensors, events, small_run

P = lora.PREFIX
LAYERS = {"l0": (6, 5), "l1": (4, 7)}  # name: (out, in)


def client_states(n, r=3, seed=0, shared_a=None):
    """n adapter states on LAYERS (random A and B, or every A = shared_a's)."""
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(n):
        s = {}
        for layer, (out, inp) in LAYERS.items():
            s[f"{P}{layer}.lora_A.weight"] = (
                shared_a[f"{P}{layer}.lora_A.weight"].clone() if shared_a else torch.randn(r, inp, generator=g)
            )
            s[f"{P}{layer}.lora_B.weight"] = torch.randn(out, r, generator=g)
        states.append(s)
    return states


def exact_mean(states, weights, layer, scale=1.0):
    """sum_k p_k s B_k A_k in float64, the dense way."""
    p = [w / sum(weights) for w in weights]
    return sum(
        pk * scale * s[f"{P}{layer}.lora_B.weight"].double() @ s[f"{P}{layer}.lora_A.weight"].double()
        for pk, s in zip(p, states, strict=True)
    )


def product(state, layer):
    return state[f"{P}{layer}.lora_B.weight"].double() @ state[f"{P}{layer}.lora_A.weight"].double()


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fedavg_error_equals_a_dense_float64_recomputation():
    states, weights = client_states(3, seed=1), [5.0, 2.0, 1.0]
    errors = fedavg.fedavg_error(states, weights)
    assert errors.keys() == {f"{P}{layer}" for layer in LAYERS}
    avg = fedavg.weighted_average([{k: v.double() for k, v in s.items()} for s in states], weights)
    for layer in LAYERS:
        exact = exact_mean(states, weights, layer)
        dense = ((exact - product(avg, layer)).norm() / exact.norm()).item()
        assert dense > 0.1  # far from exact on independent random factors
        assert errors[f"{P}{layer}"] == pytest.approx(dense, rel=1e-9)
    same = client_states(1, seed=2) * 3  # one state three times: FedAvg is exact
    assert max(fedavg.fedavg_error(same, weights).values()) == 0
    near = [{k: v + 1e-7 * i for k, v in s.items()} for i, s in enumerate(same)]  # tiny spread: no cancellation
    for layer in LAYERS:
        exact = exact_mean(near, weights, layer)
        avg = fedavg.weighted_average([{k: v.double() for k, v in s.items()} for s in near], weights)
        dense = ((exact - product(avg, layer)).norm() / exact.norm()).item()
        assert fedavg.fedavg_error(near, weights)[f"{P}{layer}"] == pytest.approx(dense, rel=1e-6)
    zero_b = [{k: v * 0 if "lora_B" in k else v for k, v in s.items()} for s in states]
    assert set(fedavg.fedavg_error(zero_b, weights).values()) == {0.0}  # the exact mean is zero
    assert fedavg.fedavg_error([{k: v for k, v in s.items() if "lora_B" in k} for s in states], weights) == {}


def test_stack_of_two_rounds_is_the_exact_weighted_sum_of_products():
    """Round 1 (3 clients) then round 2 (2 clients) on top: B A equals both rounds' sum_k p_k s B_k A_k."""
    r1, w1, r2, w2, s = client_states(3, seed=3), [3.0, 1.0, 2.0], client_states(2, seed=4), [1.0, 1.0], 2.5
    stacked = fedavg.stack_lora(fedavg.stack_lora({}, r1, w1, s), r2, w2, s)
    for layer, (out, inp) in LAYERS.items():
        assert stacked[f"{P}{layer}.lora_A.weight"].shape == (5 * 3, inp)
        assert stacked[f"{P}{layer}.lora_B.weight"].shape == (out, 5 * 3)
        want = exact_mean(r1, w1, layer, s) + exact_mean(r2, w2, layer, s)
        assert relative(product(stacked, layer), want) < 1e-6
    dora = [{**st, f"{P}l0.lora_magnitude_vector": torch.ones(6)} for st in r1]
    with pytest.raises(ValueError, match="DoRA adapters cannot be stacked"):
        fedavg.stack_lora({}, dora, w1, s)


def test_the_stack_in_a_model_adds_exactly_its_product():
    """load_stack puts the stack in as adapter "stacked" at scaling 1, rebuilt when its rank grows."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("l0", nn.Linear(5, 6))
    model.add_module("l1", nn.Linear(6, 4))
    lora.inject(model, ["l0"], "global", r=3, alpha=6)
    x = torch.randn(2, 5)
    base = model.l0.base(x)
    states = [{k: v for k, v in s.items() if k.startswith(f"{P}l0.")} for s in client_states(2, seed=5)]
    stacked = {}
    for rnd in range(2):  # rank 6, then 12
        stacked = fedavg.stack_lora(stacked, states, [1.0, 3.0], 2.0)
        assert fl_client.load_stack(model, stacked, ["l0"]) == ["stacked"]
        lora.set_active(model, ["stacked"])
        want = base.double() + x.double() @ ((rnd + 1) * exact_mean(states, [1.0, 3.0], "l0", 2.0)).t()
        assert torch.allclose(model.l0(x).double(), want, atol=1e-5)
        assert model.l0.config["stacked"]["r"] == 6 * (rnd + 1) and model.l0.config["stacked"]["scale"] == 1
    assert fl_client.load_stack(model, {}, ["l0"]) == [] and "stacked" not in model.l0.config


@pytest.mark.parametrize("use_dp", [False, True])
def test_ffa_aggregate_is_the_exact_weighted_mean_of_the_products(use_dp):
    """Clients that share A send B alone; the server's adapter (frozen A, averaged B) has the product
    sum_k p_k B_k A. The same clients with their own A: FedAvg of the factors is not exact."""
    overrides = ["federated.aggregation=ffa"] + (["federated.dp_clip=100"] if use_dp else [])
    cfg = C.load_config(CONFIG, overrides)
    initial = {k: v * 0 if "lora_B" in k else v for k, v in client_states(1, seed=6)[0].items()}
    trained = client_states(3, seed=7, shared_a=initial)
    weights = [1, 1, 1] if use_dp else [4, 1, 2]  # DP: an equal-weight mean (fedavg.dp_mean)
    server = fl_server.Server(cfg, ["a", "b", "c"], initial)
    assert server.global_state.keys() == {k for k in initial if "lora_B" in k}
    uploads = [fedavg.AGGREGATIONS["ffa"].split(s)[0] for s in trained]
    assert all(u.keys() == server.global_state.keys() for u in uploads)  # B only: half of these factors
    # with DP: no noise (dp_noise 0) and a clip far above the updates: the fixed-denominator mean of all three
    replies = {c: (u, n, 0.0) for c, u, n in zip("abc", uploads, [4, 1, 2], strict=True)}
    assert server.aggregate(1, ["a", "b", "c"], replies, [])
    full = server.adapter({})[0]
    for layer in LAYERS:
        assert torch.equal(full[f"{P}{layer}.lora_A.weight"], initial[f"{P}{layer}.lora_A.weight"])
        assert relative(product(full, layer), exact_mean(trained, weights, layer)) < 1e-6
    assert server.report["bytes_per_upload"] == fedavg.state_bytes(uploads[0])
    assert "fedavg_error_mean" not in server.report  # the uploads hold no A: nothing to be inexact
    own_a = client_states(3, seed=7)
    average = fedavg.weighted_average(own_a, weights)
    assert min(relative(product(average, layer), exact_mean(own_a, weights, layer)) for layer in LAYERS) > 1e-2


def test_fedsa_never_uploads_b_and_reports_fedavg_error_where_it_can(cache_dir, tmp_path, capsys, monkeypatch):
    """Through federated.main: fedsa's uploads are A alone; each client keeps its own B (clients/<name>/
    global), the server's round_NNN/global holds A alone. The round record's bytes are the uploads'.
    And for fedavg (the default) the reported FedAvg error equals a float64 recomputation from the uploads."""
    seen = []
    real = fl_server.Server.aggregate

    def spy(self, rnd, sampled, replies, failed, malformed=None):
        seen.append((self.agg, [dict(u) for u, _, _ in replies.values()], [n for _, n, _ in replies.values()]))
        return real(self, rnd, sampled, replies, failed, malformed)

    monkeypatch.setattr(fl_server.Server, "aggregate", spy)
    for aggregation in ("fedsa", "fedavg"):
        out = tmp_path / aggregation
        args = small_run(cache_dir, out, f"federated.aggregation={aggregation}", "federated.rounds=1")
        code, stdout, err = run_main(federated.main, args, capsys)
        assert code == 0, err
        (record,) = [r for r in events(out) if "uploaded_bytes" in r]
        _, uploads, weights = seen[-1]
        assert record["bytes_per_upload"] == fedavg.state_bytes(uploads[0])
        if aggregation == "fedsa":
            assert all(k.endswith("lora_A.weight") for u in uploads for k in u)
            assert "fedavg_error_mean" not in record
            server_side = adapter_tensors(out / "round_001/global")
            assert server_side and all(k.endswith("lora_A.weight") for k in server_side)
            own = {c: adapter_tensors(out / f"round_001/clients/{c}/global") for c in ("fr", "de", "es")}
            b_keys = [k for k in own["fr"] if k.endswith("lora_B.weight")]
            assert b_keys and not torch.equal(own["fr"][b_keys[0]], own["de"][b_keys[0]])  # each its own B
            assert all(torch.equal(own[c][k], v) for c in own for k, v in server_side.items())  # the shared A
        else:
            assert record["bytes_per_upload"] == record["bytes_per_download"]  # the whole adapter each way
            layers = fedavg.lora_pairs(uploads[0])
            recomputed = []
            for ka, kb in layers.values():
                p = [w / sum(weights) for w in weights]
                exact = sum(pk * u[kb].double() @ u[ka].double() for pk, u in zip(p, uploads, strict=True))
                a_avg = sum(pk * u[ka].double() for pk, u in zip(p, uploads, strict=True))
                b_avg = sum(pk * u[kb].double() for pk, u in zip(p, uploads, strict=True))
                recomputed.append(((exact - b_avg @ a_avg).norm() / exact.norm()).item())
            assert record["fedavg_error_mean"] == pytest.approx(sum(recomputed) / len(recomputed), rel=1e-5)
            assert record["fedavg_error_max"] == pytest.approx(max(recomputed), rel=1e-5)  # reported to 6 digits
            assert 0 < record["fedavg_error_max"] < 1
            assert f"FedAvg error {record['fedavg_error_mean']:.3g}" in stdout


def test_ffa_clients_train_b_and_never_move_a(cache_dir, tmp_path, capsys, monkeypatch):
    """Every trained global adapter under ffa keeps the A that round_NNN/global (the shared init) holds."""
    trained = []
    real = fedavg.Aggregation.split

    def spy(self, state):
        trained.append({k: v.clone() for k, v in state.items()})
        return real(self, state)

    monkeypatch.setattr(fedavg.Aggregation, "split", spy)
    out = tmp_path / "ffa"
    args = small_run(cache_dir, out, "federated.aggregation=ffa", "federated.rounds=1")
    code, _, err = run_main(federated.main, args, capsys)
    assert code == 0, err
    init = adapter_tensors(out / "round_001/global")
    after = [s for s in trained if len(s) == len(init)][-3:]  # the three clients' trained adapters
    assert len(after) == 3
    for s in after:
        assert all(torch.equal(s[k], v) for k, v in init.items() if k.endswith("lora_A.weight"))
        assert any(not torch.equal(s[k], v) for k, v in init.items() if k.endswith("lora_B.weight"))


def test_stack_round_adapter_is_a_plain_lora_of_the_stacked_rank(cache_dir, tmp_path, capsys):
    """round_NNN/global under stack is a PEFT adapter of rank (clients x r) per round, scaling 1, that the
    model loads like any other; the upload is the whole fresh adapter, the download the stack."""
    out = tmp_path / "stack"
    code, _, err = run_main(federated.main, small_run(cache_dir, out, "federated.aggregation=stack"), capsys)
    assert code == 0, err
    r = C.load_config(CONFIG, [])["lora"]["r"]
    for rnd, rank in ((1, 3 * r), (2, 6 * r)):
        config, state = lora.read_adapter(out / f"round_{rnd:03d}/global")
        assert config["r"] == config["lora_alpha"] == rank and not config["use_rslora"]
        assert all(v.shape[0] == rank for k, v in state.items() if k.endswith("lora_A.weight"))
    records = [r for r in events(out) if "uploaded_bytes" in r]
    assert records[0]["bytes_per_download"] == 0  # nothing stacked yet
    assert records[1]["bytes_per_download"] == 3 * records[1]["bytes_per_upload"]  # 3 clients' factors
    capsys.readouterr()
    bench.stack_merge(str(out / "round_002"))  # what merging it into the NF4 base would cost
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(f"nf4, stack rank {6 * r} from 2 rounds")
    assert all(float(line.split("mean ")[1].split(",")[0]) > 0 for line in lines[1:])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["federated.aggregation=mean"], "federated.aggregation: 'mean' is not one of fedavg, ffa, fedsa, stack"),
        (["federated.aggregation=stack", "federated.server_optimizer=fedadam"], "stack .* takes no server optimizer"),
        (["federated.aggregation=stack", "federated.server_lr=0.5"], "stack .* takes no server optimizer"),
        (["federated.aggregation=stack", "federated.dp_clip=0.1"], "for DP use fedavg, ffa or fedsa"),
        (["federated.aggregation=stack", "lora.use_dora=true"], "stack needs LoRA"),
    ],
)
def test_combinations_that_cannot_run_give_one_clear_line(overrides, message, cache_dir, tmp_path, capsys):
    code, _, err = run_main(federated.main, small_run(cache_dir, tmp_path / "fed", *overrides), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not os.path.exists(tmp_path / "fed")


@pytest.mark.parametrize("mode, aggregation", [("joint", "ffa"), ("joint", "fedsa"), ("global_only", "stack")])
def test_each_choice_runs_with_the_other_modes(mode, aggregation, cache_dir, tmp_path, capsys):
    """One round in joint and global_only modes: it runs, and evaluates global (and global+local) views."""
    out = tmp_path / "fed"
    args = small_run(cache_dir, out, f"federated.mode={mode}", f"federated.aggregation={aggregation}",
                     "federated.rounds=1")  # fmt: skip
    code, _, err = run_main(federated.main, args, capsys)
    assert code == 0, err
    views = {r["adapters"] for r in events(out) if "client" in r}
    assert views == ({"global"} if mode == "global_only" else {"global", "local", "global+local"})
    (record,) = [r for r in events(out) if "uploaded_bytes" in r]
    assert record["status"] == "ok" and record["succeeded"] == 3
