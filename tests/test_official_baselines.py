"""TaylorSeer, ToCa and DuCa against independent emulations of their official code.

Each emulation below is written from the official repository's semantics (named with its commit and file:line),
not from our method code: it walks the official per-step (and, where the official code decides per block,
per-block) logic and returns the set of full steps and the values a site takes. Our methods must give the same
full steps for T=50 and several N (the paper's rows among them) and the same values on random trajectories
(to 1e-10, through `methods.replay`, or the engine on a tiny model where a step reuses a whole block stack).
"""

import dataclasses
import math

import pytest
import torch

import methods
from foca_bench.config import validate
from tests.conftest import make_cfg

T = 50
TAYLORSEER = "Shenyi-Z/TaylorSeer@288776dfd0cbb6e201c654c31cd22139f848a6cf"


def configured(model: str, method: str, *overrides: str):
    """The method's config as `run.py model=<model> method=<method>` resolves it (model defaults filled in)."""
    return validate(make_cfg(f"model={model}", f"method={method}", *overrides))


# -- TaylorSeer -----------------------------------------------------------------------------------------------------

def taylorseer_dit(features: torch.Tensor, N: int, order: int, first_enhance: int = 2):
    """TaylorSeer-DiT (TAYLORSEER): the sampler counts steps down (`current['step']` = T-1-i).
    - cache_functions/cache_init.py:21,26: first_enhance = 2, activated_steps = [T-1], cache_counter = 0;
    - cache_functions/cal_type.py:6-18: full when step > T - first_enhance - 1 or cache_counter == interval - 1
      (then the counter restarts at 0), else the counter counts up;
    - taylor_utils/__init__.py:11-23: at a full step, factor i+1 = (factor i - previous factor i) / distance
      while the previous factor exists and step < T - first_enhance + 1; distance = activated[-1] - activated[-2]
      (negative: steps count down); :31-36: a skipped step sums factor_i / i! * x^i, x = step - activated[-1].
    Returns (full flags in sampling order, the value at each step)."""
    counter, activated, cache, full, out = 0, [T - 1], {}, [], []
    for step in range(T - 1, -1, -1):
        if step > T - first_enhance - 1 or counter == N - 1:
            counter = 0
            activated.append(step)
            if step == T - 1:
                cache = {}  # taylor_cache_init at the first step
            new = {0: features[T - 1 - step]}
            for i in range(order):
                if cache.get(i) is not None and step < T - first_enhance + 1:
                    new[i + 1] = (new[i] - cache[i]) / (activated[-1] - activated[-2])
                else:
                    break
            cache = new
            full.append(True)
            out.append(features[T - 1 - step])
        else:
            counter += 1
            x = step - activated[-1]
            value = 0
            for i in range(len(cache)):
                value = value + (1 / math.factorial(i)) * cache[i] * (x ** i)
            full.append(False)
            out.append(value)
    return full, torch.stack(out)


def taylorseer_mmdit(features: torch.Tensor, N: int, order: int, first_enhance: int):
    """TaylorSeer-FLUX and TaylorSeer-HunyuanVideo (TAYLORSEER): steps count up.
    - FLUX src/flux/modules/cache_functions/cache_init.py:89-100 (HunyuanVideo hyvideo/modules/cache_functions/
      cache_init.py:103-114): mode 'Taylor', first_enhance = 3 (FLUX) / 1 (HunyuanVideo); activated_steps = [0]
      (FLUX :117, HunyuanVideo :118);
    - cal_type.py:12-30 (both): full when step < first_enhance or cache_counter == cal_threshold - 1, where
      force_scheduler.py:9-15 sets cal_threshold = round(fresh_threshold / 1) at each full step;
    - taylor_utils/__init__.py:12-24 (FLUX; HunyuanVideo :12-24): factor i+1 formed while the previous factor
      exists and step > first_enhance - 2; :33-40 the Taylor sum at x = step - activated[-1]."""
    counter, activated, cache, full, out, threshold = 0, [0], {}, [], [], None
    for step in range(T):
        interval = N if step < first_enhance else threshold
        if step < first_enhance or counter == interval - 1:
            counter = 0
            activated.append(step)
            threshold = torch.round(N / torch.tensor(1.0)).item()
            if step == 0:
                cache = {}
            new = {0: features[step]}
            for i in range(order):
                if cache.get(i) is not None and step > first_enhance - 2:
                    new[i + 1] = (new[i] - cache[i]) / (activated[-1] - activated[-2])
                else:
                    break
            cache = new
            full.append(True)
            out.append(features[step])
        else:
            counter += 1
            x = step - activated[-1]
            value = 0
            for i in range(len(cache)):
                value = value + (1 / math.factorial(i)) * cache[i] * (x ** i)
            full.append(False)
            out.append(value)
    return full, torch.stack(out)


TAYLORSEER_CASES = [  # (model, N, O): N = 3..8, and the paper's rows (conf/row/table*/taylorseer_*.yaml)
    *[(model, N, O) for model in ("dit_xl_2", "flux", "hunyuan_video") for N in range(3, 9) for O in (1, 2)],
    ("dit_xl_2", 3, 4), ("dit_xl_2", 5, 4), ("flux", 4, 2), ("flux", 5, 2), ("flux", 7, 2), ("hunyuan_video", 7, 1),
]


@pytest.fixture(scope="module")
def taylorseer_configs():
    """`method=taylorseer` resolved for each model (composed once; N and O are replaced per case)."""
    return {model: configured(model, "taylorseer") for model in ("dit_xl_2", "flux", "hunyuan_video")}


@pytest.mark.parametrize("model,N,O", TAYLORSEER_CASES)
def test_taylorseer_matches_the_official_schedule_and_factor_start(taylorseer_configs, model, N, O):
    cache = dataclasses.replace(taylorseer_configs[model], N=N, O=O)
    features = torch.randn(T, 6, dtype=torch.float64)
    if model == "dit_xl_2":
        full, expected = taylorseer_dit(features, N, O)
    else:
        full, expected = taylorseer_mmdit(features, N, O, {"flux": 3, "hunyuan_video": 1}[model])
    ours = methods.build(cache)
    assert [ours.is_full(i, T) for i in range(T)] == full
    fields = {k: v for k, v in dataclasses.asdict(cache).items() if k != "name"}
    out = methods.replay("taylorseer", features, torch.arange(T, dtype=torch.float64), torch.tensor(full), **fields)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_taylorseer_first_enhance_1_is_the_former_start_and_differs_from_flux_official():
    """`cache.first_enhance=1` keeps factors from the second full step (the deviation option): on FLUX's schedule
    its first window is order 2, the official one order 1."""
    features = torch.randn(T, 3, dtype=torch.float64)
    full, official = taylorseer_mmdit(features, 5, 2, first_enhance=3)
    cache = {"N": 5, "O": 2, "warmup": 2, "time": "step"}
    mask = torch.tensor(full)
    times = torch.arange(T, dtype=torch.float64)
    former = methods.replay("taylorseer", features, times, mask, first_enhance=1, **cache)
    torch.testing.assert_close(methods.replay("taylorseer", features, times, mask, first_enhance=3, **cache), official,
                               rtol=1e-10, atol=1e-10)
    assert not torch.allclose(former[3:7], official[3:7])  # the first cache window (after full steps 0, 1, 2)
