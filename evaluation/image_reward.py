"""ImageReward (Xu et al., arXiv:2304.05977) through the `image-reward` package, in its own environment.

image-reward pins timm==0.6.13 and needs a transformers older than 4.40 (its BLIP code imports helpers that
transformers 5 removed), while open-clip-torch needs timm>=1.0.17 and diffusers' FLUX pipeline a new transformers.
So the scorer runs as a subprocess of an overlay environment, `.envs/imagereward` (`make env-imagereward`): a venv
whose own site-packages hold image-reward and its pins and which reads torch, torchvision, numpy and PIL from the
main `.venv` (appended after its own packages, so its pins win). This file is both the launcher (main env) and the
worker (`python -m evaluation.image_reward`, overlay env); the worker imports nothing from the main env's
newer stacks.

Weights: `ImageReward.pt` and `med_config.json` (https://huggingface.co/THUDM/ImageReward), plus the
`bert-base-uncased` tokenizer in the Hugging Face cache (BLIP loads it by name). Loading goes through
`ImageReward.load(<local checkpoint>, med_config=<local file>)` with HF_HUB_OFFLINE=1, so nothing is downloaded.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

ENV_DIR = Path(__file__).resolve().parent.parent / ".envs" / "imagereward"


def env_python(env_dir: Optional[str] = None) -> Path:
    return Path(env_dir or ENV_DIR) / "bin" / "python"


def run_image_reward(items: list[dict], checkpoint: Path, med_config: Path, work_dir: Path, device: str = "cpu",
                     env_dir: Optional[str] = None) -> list[float]:
    """Scores [{"image": path, "prompt": text}, ...] in the ImageReward environment; returns one reward per item."""
    python = env_python(env_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    request, answer = work_dir / "image_reward_request.json", work_dir / "image_reward_scores.json"
    request.write_text(json.dumps(items))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(python), "-m", "evaluation.image_reward", "--request", str(request), "--out", str(answer),
           "--checkpoint", str(checkpoint), "--med-config", str(med_config), "--device", device]
    proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, stderr=None)
    if proc.returncode != 0:
        raise RuntimeError(f"The ImageReward worker failed (exit {proc.returncode}); its log is above. Command: "
                           f"{' '.join(cmd)}")
    return json.loads(answer.read_text())["scores"]


def _worker(argv: list[str]) -> None:
    import torch
    from tqdm import tqdm

    import ImageReward as RM

    p = argparse.ArgumentParser()
    for name in ("--request", "--out", "--checkpoint", "--med-config", "--device"):
        p.add_argument(name, required=True)
    args = p.parse_args(argv)
    model = RM.load(args.checkpoint, device=args.device, med_config=args.med_config)
    # ImageReward.load uses load_state_dict(strict=False): check that the file really is an ImageReward checkpoint
    missing = set(model.state_dict()) - set(torch.load(args.checkpoint, map_location="cpu"))
    if missing:
        raise SystemExit(f"{args.checkpoint} is not an ImageReward checkpoint: {len(missing)} of the model's tensors "
                         f"are missing from it (e.g. {sorted(missing)[:3]}).")
    items = json.loads(Path(args.request).read_text())
    scores = []
    with torch.no_grad():
        for item in tqdm(items, desc="<image_reward> scoring", unit="image"):
            scores.append(float(model.score(item["prompt"], item["image"])))
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps({"scores": scores}))
    os.replace(tmp, args.out)


if __name__ == "__main__":
    _worker(sys.argv[1:])
