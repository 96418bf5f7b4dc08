"""`sampler.lineage=dit`: the original DiT repository's sampler, against an independent re-implementation of it.

Source (read, not copied; `dit_reference` restates its semantics):
facebookresearch/DiT@ed81ce2229091fd4ecc9a223645f95cf379d582b
- diffusion/__init__.py:20-46 `create_diffusion(str(steps))`: linear betas (gaussian_diffusion.py:106-115), learned
  sigma (LEARNED_RANGE), epsilon prediction;
- diffusion/respace.py:12-62 `space_timesteps` (one section of `steps` counts, accumulated fractional stride) and
  :73-87 `SpacedDiffusion` (betas rebuilt from the kept timesteps' alphas_cumprod), :117-129 `_WrappedModel`
  (the model sees the original timestep);
- diffusion/gaussian_diffusion.py:166-185 (float64 schedule), :254-339 `p_mean_variance` (learned-sigma split,
  x0 from eps), :341-344, :513-560 `ddim_sample` (eta = 0), :633-658 the loop over reversed indices, :861-873
  `_extract_into_tensor` (float64 -> float32);
- models.py:250-266 `forward_with_cfg`: guidance on the first three channels only.
TaylorSeer-DiT and DiT-ToCa (the paper's DiT-XL/2 rows) keep these files and call `create_diffusion(str(steps))` and
`ddim_sample_loop(model.forward_with_cfg, ..., clip_denoised=False)` (sample.py:46,81-82 in both).
"""

import numpy as np
import pytest
import torch

import methods
from foca_bench.adapters import build_adapter
from foca_bench.adapters.dit_sampler import respaced_timesteps
from foca_bench.config import validate
from foca_bench.hooks import CacheEngine
from foca_bench.identity import identity, run_id
from tests.conftest import make_cfg

TINY_DIT_XL_2 = ("model=dit_xl_2", "model.size=tiny")
# space_timesteps(1000, "50"), descending: the DiT lineage's 50 DDIM timesteps
DIT_50 = [999, 979, 958, 938, 917, 897, 877, 856, 836, 816, 795, 775, 754, 734, 714, 693, 673, 652, 632, 612, 591, 571,
          550, 530, 510, 489, 469, 449, 428, 408, 387, 367, 347, 326, 306, 285, 265, 245, 224, 204, 183, 163, 143, 122,
          102, 82, 61, 41, 20, 0]


def space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """respace.py:40-62 for comma-separated section counts."""
    counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def extract(arr: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    res = torch.from_numpy(arr)[t].float()
    while res.dim() < len(shape):
        res = res[..., None]
    return res + torch.zeros(shape)


def dit_reference(transformer, z, labels, null_class, steps, cfg_scale, guided=3):
    """DiT's `ddim_sample_loop(model.forward_with_cfg, ...)` with `create_diffusion(str(steps))`, eta = 0."""
    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
    use = space_timesteps(1000, str(steps))
    timestep_map, new_betas, last = [], [], 1.0
    for i, alpha_cumprod in enumerate(np.cumprod(1.0 - betas)):
        if i in use:
            new_betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
            timestep_map.append(i)
    ac = np.cumprod(1.0 - np.array(new_betas, dtype=np.float64))
    ac_prev = np.append(1.0, ac[:-1])
    sqrt_recip, sqrt_recipm1 = np.sqrt(1.0 / ac), np.sqrt(1.0 / ac - 1)
    x, y = torch.cat([z, z]), torch.cat([labels, torch.full_like(labels, null_class)])
    C = x.shape[1]
    for i in reversed(range(len(ac))):
        t = torch.tensor([i] * x.shape[0])
        # forward_with_cfg through _WrappedModel
        half = x[: len(x) // 2]
        out = transformer(torch.cat([half, half]), timestep=torch.tensor(timestep_map)[t], class_labels=y).sample
        eps, rest = out[:, :guided], out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        out = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
        # p_mean_variance (learned range: the variance half is unused at eta = 0), then ddim_sample
        model_output, _ = torch.split(out, C, dim=1)
        x0 = extract(sqrt_recip, t, x.shape) * x - extract(sqrt_recipm1, t, x.shape) * model_output
        eps = (extract(sqrt_recip, t, x.shape) * x - x0) / extract(sqrt_recipm1, t, x.shape)
        a, a_prev = extract(ac, t, x.shape), extract(ac_prev, t, x.shape)
        sigma = 0.0 * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        mean = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma**2) * eps
        x = mean + (t != 0).float().view(-1, 1, 1, 1) * sigma * torch.randn_like(x)
    return x.chunk(2)[0]


@pytest.fixture(scope="module")
def tiny_dit_xl_2():
    """Tiny random DiT-XL/2 (learned sigma: 8 output channels over 4 latent ones), per-step conditioning (the
    batched table differs in the last bits, docs/methods.md)."""
    cfg = make_cfg(*TINY_DIT_XL_2, "model.precompute_conditioning=false")
    validate(cfg)
    return cfg, build_adapter(cfg.model, "cpu")


def generate(adapter, lineage, steps, guided=None, labels=(3, 7), seeds=(0, 1), scale=4.0):
    with CacheEngine(methods.build({"name": "none"}), adapter.sites()) as engine:
        return adapter.generate(engine, adapter.make_noise(list(seeds)), steps, scale, guided,
                                lineage=lineage, class_labels=torch.tensor(labels))


def test_timesteps_are_the_respaced_999_to_0():
    assert respaced_timesteps(1000, 50) == DIT_50 == sorted(space_timesteps(1000, "50"), reverse=True)
    assert len(DIT_50) == 50 and {a - b for a, b in zip(DIT_50, DIT_50[1:])} == {20, 21}
    for steps in (1, 2, 20, 21, 25, 250):  # 21: the accumulated stride rounds differently from k * stride
        assert respaced_timesteps(1000, steps) == sorted(space_timesteps(1000, str(steps)), reverse=True)
    from diffusers import DDIMScheduler

    leading = DDIMScheduler(num_train_timesteps=1000)
    leading.set_timesteps(50)
    assert leading.timesteps.tolist() == list(range(980, -1, -20))  # diffusers' lineage, for contrast


@pytest.mark.parametrize("guided,steps", [(None, 20), (4, 7)])
def test_dit_lineage_equals_the_dit_repositorys_sampler(tiny_dit_xl_2, guided, steps):
    """Respaced DDIM (20 steps: 999, 946, ..., 0, gaps of 52 and 53) with forward_with_cfg's 3-channel guidance
    (guided=None; 4: the all-channel variant DiT's comment describes) on a tiny random DiT-XL/2, bit for bit."""
    cfg, adapter = tiny_dit_xl_2
    labels, noise = torch.tensor([3, 7]), adapter.make_noise([0, 1])
    ours = generate(adapter, "dit", steps, guided)
    with torch.inference_mode():
        theirs = dit_reference(adapter.transformer, noise, labels, cfg.model.num_classes, steps, 4.0, guided or 3)
    assert ours.abs().mean() > 0.1 and torch.equal(ours, theirs)
    diffusers_lineage = generate(adapter, "diffusers", steps, guided)
    assert (diffusers_lineage - ours).norm() / ours.norm() > 1e-3  # the lineages are different samplers


def test_precomputed_conditioning_stays_within_float_rounding_of_the_dit_sampler():
    cfg = make_cfg(*TINY_DIT_XL_2)
    validate(cfg)
    adapter = build_adapter(cfg.model, "cpu")
    assert adapter.cfg.precompute_conditioning
    labels, noise = torch.tensor([3, 7]), adapter.make_noise([0, 1])
    with torch.inference_mode():
        theirs = dit_reference(adapter.transformer, noise, labels, cfg.model.num_classes, 10, 4.0)
    ours = generate(adapter, "dit", 10)
    assert (ours - theirs).norm() / theirs.norm() < 1e-5  # not bit for bit: docs/methods.md


def test_lineage_defaults_validation_and_run_ids():
    def resolved(*overrides):
        cfg = make_cfg(*overrides)
        validate(cfg)
        return cfg, run_id(identity(cfg, validate(cfg)))

    toy, toy_id = resolved()
    assert toy.sampler.lineage == "diffusers" and toy.sampler.guided_channels is None
    assert "lineage" not in identity(toy, validate(toy))["sampler"]  # toy_dit's run ids are those from before
    assert resolved("sampler.lineage=diffusers")[1] == toy_id
    dit, dit_id = resolved("model=dit_xl_2")
    assert dit.sampler.lineage == "dit" and resolved("experiment=table3_dit")[0].sampler.lineage == "dit"
    assert resolved("model=dit_xl_2", "sampler.lineage=diffusers")[1] != dit_id
    assert resolved("model=dit_xl_2", "model.lineage=diffusers")[1] == resolved("model=dit_xl_2",
                                                                                "sampler.lineage=diffusers")[1]
    with pytest.raises(ValueError, match="sampler.lineage=dit: model `flux` runs diffusers"):
        resolved("model=flux", "sampler.lineage=dit")


def test_record_provenance_names_the_lineage(tiny_dit_xl_2):
    cfg, adapter = tiny_dit_xl_2
    dit = adapter.provenance(cfg.sampler)
    assert dit["lineage"] == "dit" and dit["guided_channels"] == 3 and "facebookresearch/DiT" in dit["pipeline"]
    cfg = make_cfg(*TINY_DIT_XL_2, "sampler.lineage=diffusers")
    validate(cfg)
    ours = adapter.provenance(cfg.sampler)
    assert ours["lineage"] == "diffusers" and ours["guided_channels"] == 4 and ours["scheduler"] == "DDIMScheduler"
