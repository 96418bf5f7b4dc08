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
from tests.conftest import conditions, make_cfg

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


# -- ToCa and DuCa on DiT -------------------------------------------------------------------------------------------

TOCA = "Shenyi-Z/ToCa@e84096ffd85af4540a6a1f64e3334e428e1b7377"
DUCA = "Shenyi-Z/DuCa@0a7151b7bfea3822295e8d29f26cd2e10756670c"


class OfficialDiTCache:
    """DiT-ToCa (TOCA) and DuCa-DiT (DUCA) block by block, installed as the forward of each diffusers
    `BasicTransformerBlock` of a tiny DiT (ada_norm_zero), written from the official DiT `models.py`/
    `cache_functions` and the README's DDIM-50 commands (`--cache-type attention --fresh-threshold N
    --force-fresh global --soft-fresh-weight 0.25`, ToCa `--fresh-ratio 0.07 --ratio-scheduler ToCa-ddim50`,
    DuCa `--fresh-ratio 0.05 --ratio-scheduler ToCa`). Per block (DiT-ToCa models.py:122-227, DuCa-DiT
    models.py:183-355), in DiT's countdown step = T-1-i:
    - cal_type.py:5-20 (both): full if step % cal_threshold == 0 or step == T-1; DiT-ToCa: else 'ToCa';
      DuCa-DiT: else 'ToCa' if (step % cal_threshold) % 2 == 1, else 'aggressive';
    - full: attention output, its head-mean softmax map (attention.py:57-63) and MLP output cached; force_init.py
      zeroes the block's staleness counters and calls force_scheduler.py (DiT-ToCa force_init.py:9-12: at block 0
      only; DuCa-DiT force_init.py:9: at every block): cal_threshold = round(N / (1.4 - 0.8 step / T)) in float32,
      or 2 for step in range(int(0.2T), int(0.4T)) (force_scheduler.py:6-19);
    - 'ToCa': x += gate_msa * cached attention; cache_cutfresh.py:5-50 on x: ratio = clamp(fresh_ratio x
      (3 - 4 step/T) x (0.8 + 0.4 layer/27) x 2.5, 0, 1) in float32 (fresh_ratio_scheduler.py 'ToCa-ddim50' /
      'ToCa'), score = L2-normalised received attention (scores.py:12) + 0.25 x counter / N (score_evaluate.py:
      64-70), s4 local_selection_with_bonus(score, 0.6 | 0.8, 2) (cache_cutfresh.py:21 / :21), the top
      int(ratio x tokens) tokens; counters +1, selected 0; those tokens' MLP scattered into the cache (update_cache.py);
      x += gate_mlp * cached MLP;
    - 'aggressive' (DuCa-DiT models.py:345-348): nothing, and the last block returns the last block's output of
      the previous step (`cache['noise']`, stored after the last block at every step, models.py:352-353).
    The layer factor divides by depth - 1 (27 on DiT-XL/2, where the official code hard-codes it).
    """

    def __init__(self, transformer, N: int, T: int, duca: bool):
        self.blocks = list(transformer.transformer_blocks)
        self.N, self.T, self.duca = N, T, duca
        self.fresh_ratio, self.bonus = (0.05, 0.8) if duca else (0.07, 0.6)
        self.calls = 0
        self.cache, self.attn_map, self.index, self.threshold, self.noise = {}, {}, {}, None, None
        self.hook = transformer.register_forward_pre_hook(self.next_step)
        for layer, block in enumerate(self.blocks):
            block.forward = self.block_forward(layer, block)

    def remove(self):
        self.hook.remove()
        for block in self.blocks:
            del block.forward

    def next_step(self, module, args):
        self.step = self.T - 1 - self.calls
        self.calls += 1

    def force_scheduler(self):
        step, T = self.step, self.T
        threshold = torch.round(self.N / torch.tensor(1 + 0.4 - 2 * 0.4 * step / T))
        if step in range(int(T * 0.2), int(T * 0.4)):
            threshold = 2
        self.threshold = int(threshold)

    def cal_type(self):
        first = self.step == self.T - 1
        interval = self.N if first else self.threshold
        if self.step % interval == 0 or first:
            return "full"
        if not self.duca or (self.step % interval) % 2 == 1:
            return "ToCa"
        return "aggressive"

    def block_forward(self, layer, block):
        L = len(self.blocks)

        def forward(hidden_states, *args, timestep=None, class_labels=None, **kwargs):
            x = hidden_states
            kind = self.cal_type()
            if kind != "aggressive":
                norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, timestep, class_labels,
                                                                                hidden_dtype=x.dtype)

                def mlp(tokens):
                    return block.ff(block.norm3(tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
            if kind == "full":
                attn = block.attn1
                q, k = (t.view(*t.shape[:2], attn.heads, -1).transpose(1, 2)  # (B, H, N, d)
                        for t in (attn.to_q(norm_x), attn.to_k(norm_x)))
                self.attn_map[layer] = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1).mean(1)
                self.cache[layer, "attn"] = attn(norm_x)
                self.index[layer] = torch.zeros(x.shape[:2], dtype=torch.int)
                if layer == 0 or self.duca:
                    self.force_scheduler()
                x = x + gate_msa.unsqueeze(1) * self.cache[layer, "attn"]
                self.cache[layer, "mlp"] = mlp(x)
                x = x + gate_mlp.unsqueeze(1) * self.cache[layer, "mlp"]
            elif kind == "ToCa":
                x = x + gate_msa.unsqueeze(1) * self.cache[layer, "attn"]
                ratio = 0.07 if not self.duca else 0.05
                ratio = ratio * (1 - 0.2 + 2 * 0.2 * layer / (L - 1)) * (1 + 2.0 - 2 * 2.0 * self.step / self.T) * 2.5
                ratio = torch.clamp(torch.tensor(ratio), 0.0, 1.0)
                score = torch.nn.functional.normalize(self.attn_map[layer].sum(dim=1), dim=1, p=2)
                score = score + 0.25 * self.index[layer].float() / self.N
                score = local_selection_with_bonus(score, self.bonus, 2)
                fresh = score.argsort(dim=-1, descending=True)[:, :int(ratio * score.shape[1])]
                self.index[layer] += 1
                self.index[layer].scatter_(1, fresh, torch.zeros_like(fresh, dtype=torch.int))
                expand = fresh.unsqueeze(-1).expand(-1, -1, x.shape[-1])
                self.cache[layer, "mlp"].scatter_(1, expand, mlp(torch.gather(x, 1, expand)))
                x = x + gate_mlp.unsqueeze(1) * self.cache[layer, "mlp"]
            elif layer == L - 1:
                x = self.noise
            if layer == L - 1:
                self.noise = x
            return x

        return forward


def local_selection_with_bonus(score, bonus_ratio, grid_size=2):
    """s4 (DiT-ToCa cache_cutfresh.py:52-82): per grid x grid patch, the top token gains bonus_ratio x its score."""
    B, n = score.shape
    side = int(n ** 0.5)
    blocks = score.view(B, side // grid_size, grid_size, side // grid_size, grid_size).permute(0, 1, 3, 2, 4)
    blocks = blocks.contiguous().view(B, -1, grid_size * grid_size)
    top, where = blocks.max(dim=-1, keepdim=True)
    blocks = blocks + torch.zeros_like(blocks).scatter_(-1, where, 1) * top * bonus_ratio
    blocks = blocks.view(B, side // grid_size, side // grid_size, grid_size, grid_size).permute(0, 1, 3, 2, 4)
    return blocks.contiguous().view(B, n)


@pytest.fixture(scope="module")
def tiny64():
    """The tiny random DiT (2 blocks, 8x8 tokens) in float64, so equal logic gives equal values to ~1e-15."""
    from foca_bench.adapters import build_adapter

    cfg = make_cfg("model.size=tiny", "model.dtype=float64")
    validate(cfg)
    return build_adapter(cfg.model, "cpu")


def run_tiny(adapter, cache, steps):
    from foca_bench.hooks import CacheEngine

    with CacheEngine(methods.build(cache), adapter.sites()) as engine:
        out = adapter.generate(engine, adapter.make_noise([0]), steps, 3.0, **conditions(adapter, [3]))
    return out, engine


@pytest.mark.parametrize("name,N", [("toca", 3), ("duca", 5)])
def test_toca_and_duca_equal_the_official_dit_code_on_a_tiny_dit(tiny64, name, N):
    """16 steps, where the official per-block rule forces only the first block at some steps (ToCa N=3: steps 5
    and 10, the others partial; DuCa N=5: partial at 7 and 10, aggressive at 13): the whole generation, attention
    scores, staleness, s4, the DDIM-50 recipe (0 tokens early) and the stack reuse included, equals the
    emulation to 1e-10."""
    steps = 16
    ours, engine = run_tiny(tiny64, {"name": name, "N": N, "warmup": 1}, steps)
    official = OfficialDiTCache(tiny64.transformer, N, steps, duca=name == "duca")
    try:
        expected, _ = run_tiny(tiny64, {"name": "none"}, steps)
    finally:
        official.remove()
    assert official.calls == steps
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    none, _ = run_tiny(tiny64, {"name": "none"}, steps)
    assert (ours - none).abs().max() > 1e-4  # the caching did something


def official_dit_kinds(N: int, T: int, duca: bool, layers: int = 28) -> list[str]:
    """The per-block kinds of each step of DiT-ToCa / DuCa-DiT (TOCA, DUCA): cal_type.py:5-20 evaluated by every
    block (models.py: `cal_type(cache_dic, current)` in DiTBlock.forward), force_scheduler.py:6-19 run by
    force_init at block 0 (DiT-ToCa force_init.py:9-12) or at every forced block (DuCa-DiT force_init.py:9).
    Returns, per step in sampling order, one letter per block: F full, C 'ToCa', A 'aggressive'."""
    threshold, out = None, []
    for step in range(T - 1, -1, -1):
        kinds = ""
        for layer in range(layers):
            first = step == T - 1
            interval = N if first else threshold
            if step % interval == 0 or first:
                kinds += "F"
                if layer == 0 or duca:
                    threshold = torch.round(N / torch.tensor(1 + 0.4 - 2 * 0.4 * step / T))
                    if step in range(int(T * 0.2), int(T * 0.4)):
                        threshold = 2
            elif not duca or (step % interval) % 2 == 1:
                kinds += "C"
            else:
                kinds += "A"
        out.append(kinds)
    return out


def official_counter_kinds(N: int, T: int, first_enhance: int, duca: bool) -> list[str]:
    """Whole-step kinds of the MMDiT codes, steps counting up: flux-ToCa (TOCA, src/flux/modules/cache_functions/
    cal_type.py:7-28: full for step <= 2, i.e. first_enhance 3, then when cache_counter == cal_threshold - 1) and
    TaylorSeer-HunyuanVideo (TAYLORSEER, hyvideo/modules/cache_functions/cal_type.py:7-41: full for step <
    first_enhance = 1, else the counter; DuCa mode: 'ToCa' when the incremented counter is odd, else
    'aggressive'); force_scheduler.py sets cal_threshold = round(N / 1) at each full step."""
    counter, out = 0, []
    for step in range(T):
        if step < first_enhance or counter == N - 1:
            counter = 0
            out.append("F")
        else:
            counter += 1
            out.append("C" if not duca or counter % 2 == 1 else "A")
    return out


# N = 3..8: the paper's rows (DiT ToCa 3, 6; DuCa 3, 5; HunyuanVideo 5) among them; no official FLUX DuCa code
SCHEDULE_CASES = [(model, name, N) for model, name in (("dit_xl_2", "toca"), ("dit_xl_2", "duca"), ("flux", "toca"),
                                                       ("hunyuan_video", "toca"), ("hunyuan_video", "duca"))
                  for N in range(3, 9)]
_CONFIGURED: dict = {}


@pytest.mark.parametrize("model,name,N", SCHEDULE_CASES)
def test_toca_and_duca_step_kinds_equal_the_official_schedules(model, name, N):
    if (model, name) not in _CONFIGURED:  # composed once per pair
        _CONFIGURED[model, name] = configured(model, name)
    ours = methods.build(dataclasses.replace(_CONFIGURED[model, name], N=N))
    if model == "dit_xl_2":
        expected = official_dit_kinds(N, T, duca=name == "duca")
    else:
        expected = [k * 28 for k in official_counter_kinds(N, T, {"flux": 3, "hunyuan_video": 1}[model],
                                                           duca=name == "duca")]
    kinds = [ours.kinds(methods.Step(i, 0.0, T)) for i in range(T)]
    assert [first + rest * 27 for first, rest in kinds] == expected
    assert [ours.is_full(i, T) for i in range(T)] == [set(k) == {"F"} for k in expected]


def test_toca_full_step_counts_at_t50():
    """First-block force steps (the issue's count, 20/17/14/13 at N=3/4/5/6) and all-block ones on DiT."""
    first = [sum(k[0] == "F" for k in official_dit_kinds(N, T, duca=False)) for N in (3, 4, 5, 6)]
    every = [sum(set(k) == {"F"} for k in official_dit_kinds(N, T, duca=False)) for N in (3, 4, 5, 6)]
    assert first == [20, 17, 14, 13] and every == [18, 14, 11, 10]
    ours = [methods.build(configured("dit_xl_2", "toca", f"cache.N={N}")) for N in (3, 4, 5, 6)]
    assert [sum(m.is_full(i, T) for i in range(T)) for m in ours] == every


@pytest.mark.parametrize("model", ["flux", "hunyuan_video"])
def test_mmdit_fresh_ratio_is_the_official_tocas(model):
    """fresh_ratio_scheduler.py 'ToCa' of flux-ToCa (TOCA, :42-56) and TaylorSeer-HunyuanVideo (TAYLORSEER, :42-56):
    fresh_ratio x (1 + 0.5 - 2 x 0.5 x layer / 27) x (1 - 0.6) for the double stream, no step factor."""
    ours = methods.build(configured(model, "toca"))
    for layer in range(19):
        for i in (1, 25, 49):
            tokens = methods.Tokens("mlp", layer, 57, batch=1, count=4096)
            expected = 0.1 * (1 + 0.5 - 2 * 0.5 * layer / 27) * (1 - 0.0 + 2 * 0.0 * i / T) * (1 - 0.6)
            assert ours.fresh_ratio(methods.Step(i, 0.0, T), tokens) == pytest.approx(expected, rel=1e-12)
