"""Reading the original Inf-DiT checkpoint into our modules: the key map, and nothing loaded silently.

The authors publish one DeepSpeed file, `mp_rank_00_model_states.pt`, whose `module` entry is the state dict of
SwissArmyTransformer's `DiffusionEngine` (THUDM/Inf-DiT `dit/model.py`). `KEY_MAP` renames each of its parameters
onto ours (`foca_bench/inf_dit/model.py`); `SPLIT` cuts the one stacked parameter into per-layer ones; `UNUSED`
lists, with the reason, the entries the original stores but never uses at inference. Any other entry, any of
our parameters left unfilled, or a shape that differs, is an error that names it (no `strict=False`). The
OpenCLIP image tower comes from the checkpoint's `image_encoder.model.visual.*` when it carries them (the
original loads the checkpoint over the pretrained tower, so those are the weights it ran with), else from
`model.clip_path` (an OpenCLIP checkpoint of ViT-L-14, e.g. DataComp-XL `open_clip_pytorch_model.bin`).
docs/models.md prints the map.
"""

import logging
import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

log = logging.getLogger("foca_bench")

CHECKPOINT_FILE = "mp_rank_00_model_states.pt"
WHERE = ("the Inf-DiT checkpoint the authors publish (THUDM/Inf-DiT README, 'Model weights can be downloaded from "
         "here': https://cloud.tsinghua.edu.cn/f/6e313f7e1236468e973b/?dl=1)")
CLIP_WHERE = ("an OpenCLIP ViT-L-14 checkpoint: the original uses pretrained='datacomp_xl_s13b_b90k' "
              "(laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K, open_clip_pytorch_model.bin)")

# original name -> our name; {i}: a layer index, {p}: weight or bias, {n}: a Sequential index
KEY_MAP: list[tuple[str, str]] = [
    ("mixins.patch_embed.proj.{p}", "patch_embed.{p}"),
    ("time_embed.mlp.{n}.{p}", "time_embed.mlp.{n}.{p}"),
    ("cond_embed.map_vector.{n}.{p}", "vector_embed.{n}.{p}"),
    ("mixins.adaln_layer.adaLN_modulations.{i}.1.{p}", "blocks.{i}.modulation.1.{p}"),
    ("transformer.layers.{i}.attention.query_key_value.{p}", "blocks.{i}.attn.qkv.{p}"),
    ("transformer.layers.{i}.attention.dense.{p}", "blocks.{i}.attn.proj.{p}"),
    ("mixins.adaln_layer.q_layer_norm.{i}.{p}", "blocks.{i}.attn.qk_norm.{p}"),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("mixins.adaln_layer.proj_lr.{p}", "lr_proj.{p}"),
    ("mixins.adaln_layer.cross_attention.query.{p}", "blocks.0.cross_attn.q.{p}"),
    ("mixins.adaln_layer.cross_attention.key_value.{p}", "blocks.0.cross_attn.kv.{p}"),
    ("mixins.adaln_layer.cross_attention.dense.{p}", "blocks.0.cross_attn.proj.{p}"),
    ("mixins.adaln_layer.cross_q_ln.{p}", "blocks.0.cross_attn.q_norm.{p}"),
    ("mixins.adaln_layer.cross_k_ln.{p}", "blocks.0.cross_attn.k_norm.{p}"),
    ("mixins.adaln_layer.lr_query_position_embedding", "blocks.0.cross_attn.query_pos"),
    ("mixins.adaln_layer.lr_key_position_embedding", "blocks.0.cross_attn.key_pos"),
    ("mixins.adaln_layer.post_cross_attention_layernorm.{p}", "blocks.0.norm_mlp.{p}"),
    ("mixins.final_layer.adaLN_modulation.1.{p}", "final.modulation.1.{p}"),
    ("mixins.final_layer.linear.{p}", "final.linear.{p}"),
]
_FIELDS = {"i": r"\d+", "p": "weight|bias", "n": "[02]"}
# one original tensor -> one of ours per index of its first dimension: (num_layers, 4, heads, head_dim)
SPLIT: dict[str, str] = {"mixins.adaln_layer.re_pos_embed": "blocks.{}.attn.neighbour_embed"}
# original entries not used at inference (regex -> why)
UNUSED: dict[str, str] = {
    r"transformer\.position_embeddings\.weight": "SAT's learned absolute positions; Inf-DiT's AdaLN mixin overrides "
                                                 "the position hook to return None",
    r"mixins\.adaln_layer\.k_layer_norm\.\d+\.(weight|bias)": "built but never applied: the original normalises keys "
                                                             "with q_layer_norm",
    r"mixins\.adaln_layer\.rope\.freqs_(cos|sin)": "the 2-D RoPE tables, a function of the config: recomputed",
    r"image_encoder\.model\.(token_embedding\.weight|positional_embedding|text_projection|logit_scale|logit_bias)":
        "OpenCLIP's text-tower remainder; Inf-DiT embeds only the image (its add_text is forced off)",
}
CLIP_PREFIX = "image_encoder.model.visual."


class CheckpointKeyError(KeyError):
    """The checkpoint's names or shapes do not match the key map; the message names every offending entry."""


def checkpoint_file(location: str) -> Path:
    """`model.path` as the checkpoint file: the file itself, or a folder holding `mp_rank_00_model_states.pt`."""
    path = Path(location).expanduser()
    return path / CHECKPOINT_FILE if path.is_dir() else path


def read_module_state(path: Path) -> dict[str, Tensor]:
    """The `module` state dict of a DeepSpeed model-states file (memory-mapped)."""
    try:
        blob = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # DeepSpeed files also pickle its config objects, which weights_only refuses
        log.warning(f"{path} holds more than tensors ({type(err).__name__}); loading it as a full pickle, which runs "
                    "code from the file: point model.path only at a checkpoint you trust")
        blob = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    if not isinstance(blob, dict) or "module" not in blob:
        raise CheckpointKeyError(f"{path} has no `module` entry: expected DeepSpeed's model-states file "
                                 f"({CHECKPOINT_FILE}) of {WHERE}.")
    return blob["module"]


def map_state(original: dict[str, Tensor], num_layers: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Renames the original state dict onto ours.

    Returns:
        (our model's state dict, the CLIP vision tower's state dict (empty if the checkpoint has none)).

    Raises:
        CheckpointKeyError: naming every entry the map does not know.
    """
    ours, clip, unknown = {}, {}, []
    rules = _rules(forward=True)
    for name, tensor in original.items():
        if name.startswith(CLIP_PREFIX):
            clip[name[len(CLIP_PREFIX):]] = tensor
        elif name in SPLIT:
            if tensor.shape[0] != num_layers:
                raise CheckpointKeyError(f"{name} has shape {tuple(tensor.shape)}; expected ({num_layers}, ...).")
            ours.update({SPLIT[name].format(i): tensor[i] for i in range(num_layers)})
        elif any(re.fullmatch(pattern, name) for pattern in UNUSED):
            continue
        else:
            target = _rename(name, rules)
            if target is None:
                unknown.append(name)
            else:
                ours[target] = tensor
    if unknown:
        raise CheckpointKeyError(f"{len(unknown)} checkpoint entries are not in the Inf-DiT key map "
                                 f"(foca_bench/inf_dit/checkpoint.py): {', '.join(sorted(unknown))}.")
    return ours, clip


def load_into(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """`module.load_state_dict(state)`, after naming every missing, unexpected or mis-shaped entry."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs ours {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(unexpected)}" if unexpected else "",
                f"shape mismatch {'; '.join(shapes)}" if shapes else ""]
    if any(problems):
        raise CheckpointKeyError(f"{what}: {'; '.join(p for p in problems if p)}. Check model.arch against the "
                                 "checkpoint (the released model: 28 layers, width 1280, 16 heads).")
    module.load_state_dict(state, strict=True)


def load_clip_file(path: Path) -> dict[str, Tensor]:
    """The vision tower's state dict from an OpenCLIP checkpoint file (`visual.*` keys, optionally under
    `state_dict`, optionally with DDP's `module.` prefix)."""
    blob = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    blob = blob.get("state_dict", blob)
    visual = {}
    for name, tensor in blob.items():
        name = name.removeprefix("module.")
        if name.startswith("visual."):
            visual[name[len("visual."):]] = tensor
    if not visual:
        raise CheckpointKeyError(f"{path} has no `visual.*` entries: model.clip_path needs {CLIP_WHERE}.")
    return visual


def original_names(ours: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Our state dict under the original's names (`KEY_MAP` and `SPLIT` inverted), without the unused entries: how
    a synthetic original checkpoint and the golden comparison's weights are written."""
    rules, out = _rules(forward=False), {}
    for name, tensor in ours.items():
        if not name.endswith("attn.neighbour_embed"):
            source = _rename(name, rules)
            if source is None:
                raise CheckpointKeyError(f"our parameter {name} has no original name in the key map.")
            out[source] = tensor
    (stacked, template), = SPLIT.items()
    out[stacked] = torch.stack([ours[template.format(i)] for i in range(num_layers)])
    return out


def _rules(forward: bool) -> list[tuple[re.Pattern, str]]:
    """(regex of one side's names, template of the other side) for every KEY_MAP entry."""
    rules = []
    for original, ours in KEY_MAP:
        source, target = (original, ours) if forward else (ours, original)
        regex = re.escape(source)
        for field, allowed in _FIELDS.items():
            regex = regex.replace(re.escape("{" + field + "}"), f"(?P<{field}>{allowed})")
        rules.append((re.compile(regex), target))
    return rules


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> Optional[str]:
    for regex, template in rules:
        match = regex.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


def load_original(location: str, model: nn.Module, clip: nn.Module, clip_path: Optional[str]) -> str:
    """Loads the original checkpoint into `model` and the CLIP tower into `clip`; returns where the tower came from."""
    path = checkpoint_file(location)
    ours, visual = map_state(read_module_state(path), model.arch.num_layers)
    load_into(model, ours, f"Inf-DiT checkpoint {path}")
    source = f"{path} (image_encoder.model.visual)"
    if not visual:
        if not clip_path or not Path(clip_path).expanduser().is_file():
            from foca_bench.adapters.base import MissingWeightsError

            where = "is not set" if not clip_path else f"={clip_path} does not exist"
            raise MissingWeightsError(f"{path} carries no CLIP tower (image_encoder.model.visual.*) and "
                                      f"model.clip_path {where}: set it to {CLIP_WHERE}.")
        visual, source = load_clip_file(Path(clip_path).expanduser()), str(clip_path)
    elif clip_path:
        log.info(f"<inf_dit> the checkpoint carries its CLIP tower; model.clip_path={clip_path} is not used")
    load_into(clip.visual, visual, f"OpenCLIP vision tower from {source}")
    return source
