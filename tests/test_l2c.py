"""L2C (methods/l2c.py, foca_bench/train_l2c.py) against an independent emulation of the official DiT code
(horseee/learning-to-cache@d6cc781): which sites compute at each step (DiT/models/dynamic_models.py:238-265
`load_ranking`, :283-318 `forward`), router files in the official format (an official-style checkpoint with its
optimizer state and argparse arguments loads; a missing or corrupt one fails naming the file and the key), the
training's interpolation and loss (DiT/diffusion/gaussian_diffusion.py:717-781 `router_training_losses`,
DiT/train_router.py:244-266); FLOPs of a tiny run against their closed form."""

import argparse

import pytest
import torch

import methods
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from foca_bench.train_l2c import main as train_main
from methods.l2c import load_router
from tests.conftest import conditions, flops_of, make_cfg, write_router

SITES = 4  # tiny DiT: attention and MLP of 2 blocks


def official_decisions(logits, threshold):
    """dynamic_models.py: ranks from the even routers (l. 251-253), then per step (cur_timestep counts down from
    T - 1): an odd index clears the cached features (l. 298-299); a site reuses when it has a cached feature and
    is not in the step's rank (l. 304-309). Returns per step the computed site indices."""
    T = len(logits)
    rank = {i: torch.nonzero(torch.sigmoid(logits[i]) > threshold).flatten().tolist() for i in range(0, T, 2)}
    cached, computed = [False] * logits.shape[1], []
    for cur in range(T - 1, -1, -1):
        if cur % 2 == 1:
            cached = [False] * len(cached)
        step = [c for c in range(len(cached)) if not cached[c] or c in rank[cur]]
        cached = [True] * len(cached)
        computed.append(step)
    return computed


def _run(adapter, cache, steps):
    calls = {}
    hooks = []
    for i, block in enumerate(adapter.transformer.transformer_blocks):
        for j, module in enumerate((block.attn1.to_q, block.ff.net[0])):  # run only if computed
            hooks.append(module.register_forward_hook(
                lambda *a, c=2 * i + j: calls.setdefault(engine.total_steps - 1, []).append(c)))
    method = methods.build(cache)
    try:
        with CacheEngine(method, adapter.sites()) as engine:
            adapter.generate(engine, adapter.make_noise([0, 1]), steps, 1.5, **conditions(adapter, [1, 2]))
    finally:
        for h in hooks:
            h.remove()
    return [sorted(calls.get(i, [])) for i in range(steps)], method


@pytest.mark.parametrize("steps", [8, 7])
def test_decisions_match_the_official_forward(adapter, tmp_path, steps):
    logits = torch.randn(steps, SITES, generator=torch.Generator().manual_seed(steps)) * 3
    path = write_router(tmp_path / "router.pt", logits)
    computed, method = _run(adapter, {"name": "l2c", "router_path": path, "threshold": 0.1}, steps)
    assert computed == official_decisions(logits, 0.1)
    assert any(len(c) < SITES for c in computed)  # the random router does cache something
    assert method.provenance()["router_sha256"] == load_router(path).sha256


def test_flops_of_a_tiny_run_match_the_closed_form(adapter, tmp_path):
    """Each attention a routed step skips saves 8 B S D^2 + 4 B S^2 D, each MLP 4 B S D F (B = 2, S = 64, D = 32,
    F = 128); everything else runs at every step."""
    B, S, D, Fh, steps = 2, 64, 32, 128, 8
    logits = torch.randn(steps, SITES, generator=torch.Generator().manual_seed(3)) * 3
    path = write_router(tmp_path / "router.pt", logits)
    saved = 0
    for computed in official_decisions(logits, 0.1):
        for c in set(range(SITES)) - set(computed):
            saved += 8 * B * S * D * D + 4 * B * S * S * D if c % 2 == 0 else 4 * B * S * D * Fh
    expected = flops_of(adapter, {"name": "none"}, steps) - saved
    assert flops_of(adapter, {"name": "l2c", "router_path": path}, steps) == expected


def test_router_files_in_the_official_format_load_and_bad_ones_fail_naming_file_and_key(tmp_path):
    official = tmp_path / "DDIM4_router.pt"  # as DiT/train_router.py:321-327 saves it
    torch.save({"routers": {f"{i}.prob": torch.randn(SITES) for i in range(4)}, "opt": {"state": {}},
                "args": argparse.Namespace(num_sampling_steps=4, l1=1e-6)}, official)
    assert len(load_router(str(official)).probs) == 4
    with pytest.raises(ValueError, match=r"cache.router_path=.*nowhere.pt: no such file.*train_l2c"):
        load_router(str(tmp_path / "nowhere.pt"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cache.router_path=.*corrupt.pt.*not a readable router file"):
        load_router(str(tmp_path / "corrupt.pt"))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt has no `routers` key"):
        load_router(str(tmp_path / "other.pt"))
    torch.save({"routers": {"0.prob": torch.randn(SITES), "1.prob": torch.randn(2, 2)}}, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"key routers\[1.prob\]"):
        load_router(str(tmp_path / "shape.pt"))
    with pytest.raises(ValueError, match="nowhere.pt: no such file"):  # at validation, before any weights load
        validate(make_cfg("method=l2c", f"cache.router_path={tmp_path / 'nowhere.pt'}"))


def test_a_router_for_other_steps_or_sites_says_how_to_train_one(adapter, tmp_path):
    path = write_router(tmp_path / "r.pt", torch.zeros(5, SITES))
    with pytest.raises(ValueError, match="router has 5 steps but sampler.steps=8.*sampler.steps=8"):
        _run(adapter, {"name": "l2c", "router_path": path}, 8)
    path = write_router(tmp_path / "r3.pt", torch.full((8, 3), -5.0))
    with pytest.raises(ValueError, match="has 3 entries but this model has 4"):
        _run(adapter, {"name": "l2c", "router_path": path}, 8)


def test_training_writes_a_router_the_method_runs(tmp_path, adapter):
    """A few iterations of train_l2c on the tiny DiT and the bundled digits: the router file has one logit per
    site and step, loads, and runs; a large L1 weight drives the routed steps' betas down (the official loss)."""
    out = tmp_path / "router.pt"
    result = train_main(["model.size=tiny", "sampler.steps=4", "+train.iterations=8", "+train.batch=2",
                         "+train.lr=0.2", "+train.l1=10.0", f"+train.out={out}"])
    router = load_router(str(out))
    assert len(router.probs) == 4 and router.probs[0].shape == (SITES,)
    assert result["sites"] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    start = torch.randn(4, SITES, generator=torch.Generator().manual_seed(0))
    trained = torch.stack(router.probs)
    assert (trained[0::2] < start[0::2]).all()  # the penalty lowered every routed logit
    assert torch.equal(trained[1::2], start[1::2])  # the full steps' routers are never used nor trained
    computed, _ = _run(adapter, {"name": "l2c", "router_path": str(out)}, 4)
    assert len(computed) == 4


def test_bundled_toy_router_composes_with_its_provenance():
    cfg = make_cfg("method=l2c")
    cache = validate(cfg)
    method = methods.build(cache)
    provenance = method.provenance()
    assert provenance["router_path"].endswith("foca_bench/assets/l2c/toy_dit_50steps.pt")
    assert len(provenance["router_sha256"]) == 64 and len(method.router.probs) == 50
