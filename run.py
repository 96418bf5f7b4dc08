"""foca-bench entry point: `python run.py model=<model> method=<method> cache.<knob>=<value> benchmark=<name>`.

Composes `conf/` with Hydra (structured schemas reject unknown keys, wrong types and unknown options), runs one
configuration through `foca_bench.runner.run`, and writes its record under `results/`. `-m` sweeps, e.g.
`python run.py -m method=none,fora,taylorseer,foca cache.N=3,5`.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import foca_bench.config  # noqa: F401  (registers the schemas)
import methods  # noqa: F401  (registers the method schemas)
from foca_bench.adapters.base import MissingWeightsError

log = logging.getLogger("foca_bench")


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from foca_bench.runner import run

    try:
        record = run(cfg)
    except (ValueError, MissingWeightsError) as err:
        log.error(str(err))
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if record.get("faults"):
        message = (f"run {record['run_id']} produced non-finite values, recorded as null: "
                   f"{', '.join(f['field'] for f in record['faults'])}")
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise NonFiniteRun(message)  # not an exit: the sweep finishes its other jobs, then fails
        log.error(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(3)


class NonFiniteRun(RuntimeError):
    """A run's samples or metrics were NaN or infinite (its record names them under `faults`)."""


if __name__ == "__main__":
    main()
