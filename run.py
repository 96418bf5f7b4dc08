"""foca-bench entry point: `python run.py model=<model> method=<method> cache.<knob>=<value> benchmark=<name>`.

Composes `conf/` with Hydra (structured schemas reject unknown keys, wrong types and unknown options), runs one
configuration through `foca_bench.runner.run`, and writes its record under `results/`. `-m` sweeps, e.g.
`python run.py -m method=none,fora,taylorseer,foca cache.N=3,5`, run every cell: a failing one is listed with its
reason when the sweep ends (`foca_bench.sweeps`) and the exit status is 1.

A bad input (a config value, a missing or corrupt file) ends a single run with one message naming the key or file
and exit status 2; a run whose samples or metrics are NaN or infinite writes them as null under the record's
`faults` and exits 3; anything else is a bug and shows its traceback.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import foca_bench.config  # noqa: F401  (registers the schemas)
import methods  # noqa: F401  (registers the method schemas)
from foca_bench.errors import MissingFileError
from foca_bench.sweeps import failed

log = logging.getLogger("foca_bench")
INPUT_ERRORS = (ValueError, MissingFileError)  # CorruptFileError is a ValueError


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from foca_bench.runner import run

    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        record = run(cfg)
    except INPUT_ERRORS as err:
        log.error(str(err))
        if not sweep:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        return failed(str(err))
    except Exception as err:  # a bug: its traceback goes to the cell's log, and the sweep goes on
        if not sweep:
            raise
        log.exception(f"The cell failed: {type(err).__name__}: {err}")
        return failed(f"{type(err).__name__}: {err} (traceback in the cell's log)")
    if record.get("faults"):
        message = (f"run {record['run_id']} produced non-finite values, recorded as null: "
                   f"{', '.join(f['field'] for f in record['faults'])}")
        log.error(message)
        if sweep:  # not an exit: the sweep finishes its other cells, lists this one as failed and exits 1
            return failed(message)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(3)
    return record


if __name__ == "__main__":
    main()
