"""Sharded sample generation on disk, in the shape of DiT's `sample_ddp.py` (arXiv:2212.09748), with resume.

A benchmark is a fixed, ordered list of samples. Sample `i` has seed `benchmark.seed + i` and one lossless file
named by its zero-padded global index (`000042.png`). Generation batches lie on a fixed grid of global indices
(batch `b` is samples `[b * B, (b + 1) * B)`), and shard `s` of `k` takes the batches `b` with `b % k == s`. So:

- the same samples come out on 1 or 8 GPUs (same seeds, same batch compositions);
- a rerun skips every batch whose files are all on disk and readable; a missing, truncated or corrupt file
  (PNG CRCs, a decode that fails, a wrong size) makes its batch generate again, and only the bad files are
  rewritten;
- every file is written to a temporary name and renamed into place, so a killed job leaves no half file under
  a sample's name;
- whichever process finds the set complete packs `samples.npz` (`arr_0`, uint8 NHWC, as ADM's evaluator reads)
  and only then writes the `DONE` marker: all shards meet at that file-system barrier.
"""

import hashlib
import json
import logging
import os
import socket
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from foca_bench.records import atomic_write, atomic_write_json

log = logging.getLogger("foca_bench")


@dataclass(frozen=True)
class Sample:
    """One entry of a benchmark's fixed list.

    Attributes:
        index: position in the list (the global sample index).
        seed: `benchmark.seed + index`.
        label: class label of a class-conditional benchmark, else -1.
        prompt: text prompt of a text-conditioned benchmark, else None.
        condition: path of the file a conditioning input is made from (DIV8K's ground-truth image), else None.
    """

    index: int
    seed: int
    label: int = -1
    prompt: Optional[str] = None
    condition: Optional[str] = None


def shard_from_env() -> tuple[int, int]:
    """(rank, world size) of a launcher that sets them: torchrun (RANK/WORLD_SIZE), SLURM tasks
    (SLURM_PROCID/SLURM_NTASKS), else (0, 1)."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in os.environ and world in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return 0, 1


def resolve_shard(bench_cfg: Any) -> tuple[int, int]:
    """`benchmark.shard`/`benchmark.num_shards` when set, else the launcher's rank and world size."""
    if bench_cfg.get("num_shards") is not None:
        return int(bench_cfg.shard or 0), int(bench_cfg.num_shards)
    return shard_from_env()


def batches(n: int, batch_size: int, shard: int = 0, num_shards: int = 1) -> list[range]:
    """The fixed batch grid over `n` samples, the batches of one shard."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"benchmark.shard={shard} must lie in [0, benchmark.num_shards={num_shards}).")
    grid = [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    return grid[shard::num_shards]


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [0, 1] -> (B, H, W, C) uint8, rounding as torchvision's `save_image` does."""
    return images.detach().float().mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_png(path: Path, image: np.ndarray) -> None:
    """One (H, W, C) uint8 image, atomically."""
    mode = "L" if image.shape[-1] == 1 else "RGB"
    pil = Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode)
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def read_png(path: Path) -> np.ndarray:
    """(H, W, C) uint8; raises on a truncated or corrupt file (PIL checks PNG CRCs while decoding)."""
    with Image.open(path) as im:
        im.load()
        array = np.asarray(im)
    return array[..., None] if array.ndim == 2 else array


def write_mp4(path: Path, video: np.ndarray, fps: int) -> None:
    """One (F, H, W, 3) uint8 video as lossless RGB H.264 (`libx264rgb -qp 0`, ffmpeg from imageio-ffmpeg),
    atomically. VBench's readers (decord, OpenCV) decode it to the exact frames (tested)."""
    import imageio_ffmpeg

    F, H, W, _ = video.shape

    def write(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(str(tmp), (W, H), fps=fps, codec="libx264rgb", pix_fmt_out="rgb24",
                                             output_params=["-qp", "0", "-f", "mp4"], macro_block_size=1,
                                             ffmpeg_log_level="error")
        writer.send(None)
        for frame in video:
            writer.send(np.ascontiguousarray(frame))
        writer.close()

    atomic_write(path, write)


def read_mp4(path: Path) -> np.ndarray:
    """(F, H, W, 3) uint8; raises on a truncated or corrupt file (ffmpeg fails or yields no frame)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(reader)
        W, H = meta["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(H, W, 3) for f in reader]
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path} decodes to no frames")
    return np.stack(frames)


class IncompleteSamples(RuntimeError):
    """Some samples of a folder are missing or unreadable; `missing` lists their indices."""

    def __init__(self, missing: list[int], total: int, root: Path) -> None:
        self.missing = missing
        super().__init__(f"{len(missing)} of {total} samples are missing or unreadable in {root} (first: "
                         f"{missing[:5]}); rerun the job (every shard) to generate them.")


class SampleStore:
    """The sample folder of one run: `results/samples/<benchmark>/<model>/<method>/<samples_key>/` (`identity`).

    Args:
        root: the folder.
        samples: the benchmark's full, ordered sample list.
        shape: expected (H, W, C) of every image file, checked on read; None skips the check.
    """

    def __init__(self, root: Path, samples: Sequence[Sample], shape: Optional[tuple[int, ...]] = None) -> None:
        self.root = Path(root)
        self.samples = list(samples)
        self.shape = shape

    packs_npz = True  # image folders pack `samples.npz`; a video folder is its own manifest (VBench reads the files)

    def path(self, sample: Sample) -> Path:
        return self.root / f"{sample.index:06d}.png"

    def write_file(self, path: Path, array: np.ndarray) -> None:
        write_png(path, array)

    def read_file(self, path: Path) -> np.ndarray:
        return read_png(path)

    @property
    def npz(self) -> Path:
        return self.root / "samples.npz"

    @property
    def done(self) -> Path:
        return self.root / "DONE"

    def read(self, sample: Sample) -> np.ndarray:
        array = self.read_file(self.path(sample))
        if self.shape is not None and tuple(array.shape) != tuple(self.shape):
            raise ValueError(f"{self.path(sample)} has shape {tuple(array.shape)}, expected {tuple(self.shape)}")
        return array

    def read_checked(self, sample: Sample) -> Optional[np.ndarray]:
        """The sample's array, or None when its file is missing or does not read back whole at the expected
        shape (truncated, corrupt, wrong size: regenerated rather than used)."""
        path = self.path(sample)
        if not path.is_file():
            return None
        try:
            return self.read(sample)
        except Exception as err:
            log.warning(f"Sample file {path} is unreadable ({type(err).__name__}: {err}); it will be regenerated")
            return None

    def valid(self, sample: Sample) -> bool:
        return self.read_checked(sample) is not None

    def todo(self, batch: range) -> list[int]:
        """Indices of `batch` whose files are missing or unreadable."""
        return [i for i in batch if not self.valid(self.samples[i])]

    def write(self, indices: Sequence[int], images: np.ndarray, only: Optional[set[int]] = None) -> int:
        """Writes `images[j]` as sample `indices[j]` (only those in `only` when given); returns how many."""
        written = 0
        for j, i in enumerate(indices):
            if only is None or i in only:
                self.write_file(self.path(self.samples[i]), images[j])
                written += 1
        return written

    def missing(self) -> list[int]:
        """Every index without a readable file (reads every file: a full integrity check)."""
        return [s.index for s in self.samples if not self.valid(s)]

    def complete(self) -> bool:
        return self.done.is_file() and (self.npz.is_file() or not self.packs_npz)

    def pack(self) -> Path:
        """Packs every sample into `samples.npz` (`arr_0`: (N, H, W, C) uint8 in index order; `labels` when the
        benchmark has classes; skipped for video folders), then writes `DONE` with a manifest; every file is read
        once.

        Raises:
            IncompleteSamples: some sample is missing or unreadable (nothing is written).
        """
        arrays = [self.read_checked(s) for s in self.samples]
        missing = [s.index for s, a in zip(self.samples, arrays) if a is None]
        if missing:
            raise IncompleteSamples(missing, len(self.samples), self.root)
        shape = list(arrays[0].shape)
        if self.packs_npz:
            arrays = np.stack(arrays)
            extra = {"labels": np.array([s.label for s in self.samples])} if self.samples[0].label >= 0 else {}

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    np.savez(f, arr_0=arrays, **extra)

            atomic_write(self.npz, write)
        atomic_write_json(self.done, {"count": len(self.samples), "shape": shape,
                                      "packed_by": {"host": socket.gethostname(), "pid": os.getpid()},
                                      "time": time.time(), "files": [self.path(s).name for s in self.samples]})
        return self.npz if self.packs_npz else self.done

    def write_progress(self, shard: int, num_shards: int, info: dict) -> None:
        """A shard's account of its work (`shard-<s>-of-<k>.json`), merged into the record."""
        atomic_write_json(self.root / f"shard-{shard}-of-{num_shards}.json", info)

    def progress(self) -> list[dict]:
        out = []
        for path in sorted(self.root.glob("shard-*-of-*.json")):
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return out


class ArrayStore(SampleStore):
    """Float samples as `.npy` files, lossless at the model's precision (the toy benchmark's fidelity metrics
    compare values far below an 8-bit step); `samples.npz` holds `arr_0` stacked in index order."""

    def path(self, sample: Sample) -> Path:
        return self.root / f"{sample.index:06d}.npy"

    def write_file(self, path: Path, array: np.ndarray) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, array)

        atomic_write(path, write)

    def read_file(self, path: Path) -> np.ndarray:
        return np.load(path)  # raises on a truncated file


NAME_MAX = 255  # bytes in one file name: ext4, XFS, btrfs, ZFS, APFS, NTFS (255 UTF-16 units) and Lustre all allow
STEM_MAX = NAME_MAX - 16  # room for `-<k>.mp4`
UNSAFE = frozenset('/\\<>:"|?*') | frozenset(map(chr, range(32))) | {"\x7f"}  # separators, reserved, controls
HASHED_PREFIX = 96  # bytes of a renamed prompt's text kept in its file name


def _fold(name: str) -> str:
    """What case-insensitive, normalising filesystems (APFS, NTFS, SMB shares) compare."""
    return unicodedata.normalize("NFC", name).casefold()


def prompt_stems(prompts: Sequence[str]) -> dict[str, str]:
    """The file stem of each prompt's videos (`<stem>-<k>.mp4`), deterministic for the list.

    A prompt keeps its own text as stem, the name VBench's standard mode looks for, when that is safe everywhere:
    no path separator, no character Windows or SMB reserve (`<>:"|?*`), no control character, no leading dot (a
    hidden file) or space, at most `STEM_MAX` bytes, and no earlier prompt of the list with the same name up to
    case and Unicode normalisation (VBench's own list has "a fantasy landscape", then "A fantasy landscape": on a
    case-insensitive filesystem the second would overwrite the first, so it is renamed). Any other prompt is
    renamed to its text with each unsafe character replaced by `_`, cut to `HASHED_PREFIX` bytes, then `~` and the
    first 12 hex digits of the SHA-256 of the whole prompt (UTF-8): `../../x` becomes `_.._x~<hash>`. A stem never
    holds a separator, so no file can land outside its folder; `prompts.json` maps every file to its prompt.

    Raises:
        ValueError: a prompt is not a non-empty string (the caller names the file it came from).
    """
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {i} is {prompt!r}: every prompt must be a non-empty string.")

    def safe(p: str) -> bool:
        return not UNSAFE & set(p) and p[0] not in ". " and len(p.encode("utf-8")) <= STEM_MAX

    taken: set[str] = set()

    def renamed(p: str) -> str:
        text = "".join("_" if c in UNSAFE else c for c in p).lstrip(" .") or "_"
        text = text.encode("utf-8")[:HASHED_PREFIX].decode("utf-8", errors="ignore").rstrip(" .")
        return f"{text}~{hashlib.sha256(p.encode('utf-8')).hexdigest()[:12]}"

    stems = {}
    for p in dict.fromkeys(prompts):
        stems[p] = p if safe(p) and _fold(p) not in taken else renamed(p)
        taken.add(_fold(p))
    return stems


class VideoStore(SampleStore):
    """A video benchmark's folder: one lossless mp4 per sample in `videos/`, `<stem>-<k>.mp4` for the k-th video of
    a prompt (sample index `i`: prompt `i // per_prompt`, k = `i % per_prompt`), where the stem is the prompt
    itself, the name VBench's standard mode expects, whenever that is a safe file name (`prompt_stems`). `DONE`
    lists the files and `prompts.json` maps each file name to its prompt (the `--prompt_file` of VBench's custom
    mode); there is no npz.

    Args:
        per_prompt: videos per prompt (VBench: 5).
        fps: frame rate written into the files.
        shape: expected (frames, H, W, 3), checked on read.
    """

    packs_npz = False

    def __init__(self, root: Path, samples: Sequence[Sample], per_prompt: int, fps: int,
                 shape: Optional[tuple[int, ...]] = None) -> None:
        super().__init__(root, samples, shape)
        self.per_prompt, self.fps = per_prompt, fps
        self.stems = prompt_stems([s.prompt for s in self.samples])

    @property
    def videos(self) -> Path:
        """The folder of the mp4 files alone: VBench takes the suffix of whatever file it lists first."""
        return self.root / "videos"

    def path(self, sample: Sample) -> Path:
        return self.videos / f"{self.stems[sample.prompt]}-{sample.index % self.per_prompt}.mp4"

    @property
    def manifest(self) -> Path:
        return self.root / "prompts.json"

    def pack(self) -> Path:
        """Writes the `prompts.json` manifest ({file name in `videos/`: prompt}), then checks and marks the folder
        (`SampleStore.pack`)."""
        atomic_write_json(self.manifest, {self.path(s).name: s.prompt for s in self.samples})
        return super().pack()

    def write_file(self, path: Path, array: np.ndarray) -> None:
        write_mp4(path, array, self.fps)

    def read_file(self, path: Path) -> np.ndarray:
        return read_mp4(path)
