"""Moves records written under the run ids of before input hashing to their ids now, so finished sweeps are found.

    python -m foca_bench.migrate -m experiment=toy_dit        # the overrides the sweep ran with

Until input hashing, a run's id hashed its config with `model.method_defaults` (the per-model settings of every
method) and without its input files; now it hashes the contents of its inputs (`foca_bench.identity`) and each
method's own settings only (`conf/model_method/`). So every run of an unchanged config has a new id. Given the
run's overrides, this finds the record under the old id and moves it, with its sample folder, sample grid and
trace, to the new id (the record notes `migrated_from`); `run.py` then finds it and skips the run. It trusts that
the input files the config names now are the ones the old run read, which the old id cannot tell.
"""

import json
import logging
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from foca_bench import REPO_DIR
from foca_bench.identity import identity, local_keys, run_id
from foca_bench.records import atomic_write_json, finite, record_path
from foca_bench.runner import prepare
from methods.base import CacheConfig

log = logging.getLogger("foca_bench")

# The `model.method_defaults` of each model when ids stopped hashing them: now conf/model_method/<model>_<method>.yaml.
LEGACY_METHOD_DEFAULTS = {"toy_dit": ("teacache", "diffusers_magcache", "smoothcache", "l2c"),
                          "flux": ("taylorseer", "toca", "duca", "teacache", "diffusers_magcache"),
                          "hunyuan_video": ("taylorseer", "toca", "duca", "teacache"),
                          "dit_xl_2": ("taylorseer",)}


def legacy_run_ids(cfg: DictConfig, cache: CacheConfig) -> list[str]:
    """The ids a validated config had before input hashing: its identity with every `model.method_defaults` of its
    model, its method's file knobs (`cache.*_path`) as the paths the config names, and no input hashes; then the
    same with `model.offload=none` and the memory budget, which main's ids briefly held (memory plans, 020acbe)."""
    old = identity(cfg, cache)
    old["model"]["method_defaults"] = {
        method: OmegaConf.to_container(OmegaConf.load(REPO_DIR / "conf" / "model_method" / f"{cfg.model.name}_"
                                                      f"{method}.yaml"), resolve=True)
        for method in LEGACY_METHOD_DEFAULTS.get(cfg.model.name, ())}
    for key in local_keys(cfg.cache):
        old["cache"][key] = cfg.cache[key]
    ids = [run_id(old)]
    if "offload" not in old["model"] and "offload" in cfg.model:
        ids.append(run_id({**old, "model": {**old["model"], "offload": cfg.model.offload,
                                            "memory_budget_gb": cfg.model.get("memory_budget_gb")}}))
    return ids


def legacy_run_id(cfg: DictConfig, cache: CacheConfig) -> str:
    """The id a validated config had before input hashing (`legacy_run_ids`' first)."""
    return legacy_run_ids(cfg, cache)[0]


def _move(old: Path, new: Path) -> bool:
    if not old.exists() or new.exists():
        return False
    new.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(old, new)
    return True


def migrate(cfg: DictConfig) -> str:
    """Moves the run's record from its old id to its new one; returns what it did."""
    r = prepare(cfg)
    candidates = {i: record_path(Path(r.cfg.results_dir), r.name, r.cfg.model.name, r.cache.name, i)
                  for i in legacy_run_ids(r.cfg, r.cache)}
    old_id, old = next(((i, p) for i, p in candidates.items() if p.is_file()), next(iter(candidates.items())))
    if r.record.is_file():
        return f"{r.record}: already there"
    if not old.is_file():
        return f"no record under the old id {old_id} ({old}); nothing to move"
    record = json.loads(old.read_text())
    if record.get("run_id") != old_id:
        return f"{old} holds run {record.get('run_id')}, not {old_id}; left as it is"
    samples = record.get("samples", {})
    if samples.get("folder") and r.samples is not None and _move(Path(samples["folder"]), r.samples):
        samples["folder"] = str(r.samples)
        samples["npz"] = str(r.samples / Path(samples["npz"]).name) if samples.get("npz") else None
    if record.get("sample_grid") and _move(Path(record["sample_grid"]), r.record.with_suffix(".png")):
        record["sample_grid"] = str(r.record.with_suffix(".png"))
    if record.get("trace"):
        trace = Path(record["trace"])
        if _move(trace, trace.with_name(f"{r.id}.safetensors")):
            record["trace"] = str(trace.with_name(f"{r.id}.safetensors"))
    record.update(run_id=r.id, config=r.identity, inputs=r.inputs, migrated_from=old_id)
    record, faults = finite(record)  # records from before strict JSON may hold NaN
    if faults:
        record["faults"] = record.get("faults", []) + faults
    atomic_write_json(r.record, record)
    old.unlink()
    return f"moved {old} -> {r.record}"


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    print(migrate(cfg))


if __name__ == "__main__":
    main()
