"""Pretrained weights on disk: a tiny random FLUX pipeline saved with `save_pretrained` loads through the adapter
(with accelerate: low_cpu_mem_usage, no warning), and missing and corrupt folders are told apart: a missing part is
named with the key to set, a truncated safetensors file or a broken config.json surfaces diffusers' own error."""

import json
import logging
import warnings

import pytest
import torch

from foca_bench.adapters import build_adapter
from foca_bench.adapters.base import MissingWeightsError
from foca_bench.config import compose, sized, validate
from foca_bench.errors import CorruptFileError
from tests.conftest import TINY_FLUX

WORDS = ["a", "cat", "dog", "photo", "of", "the", "red", "car"]


def tiny_flux_model_cfg(path=None):
    """The tiny FLUX's model config; with `path`, as pretrained weights from that folder."""
    cfg = compose(*TINY_FLUX)
    validate(cfg)
    model = sized(cfg.model, set())
    if path is not None:  # the tiny shapes, as a full-size model whose weights are on disk
        model.size, model.weights, model.path = "full", "pretrained", str(path)
    return model


def save_tiny_flux(folder):
    """A FluxPipeline of the tiny FLUX's transformer and VAE (the adapter's random ones), a tiny CLIP and T5 text
    encoder and tokenizers of a few words, saved with `save_pretrained` (the layout of black-forest-labs/FLUX.1-dev)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    model = tiny_flux_model_cfg()
    adapter = build_adapter(model, "cpu")
    arch = adapter.transformer.config
    words = folder / "words"
    words.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for w in WORDS + list("abcdefghijklmnopqrstuvwxyz"):
        vocab.setdefault(f"{w}</w>", len(vocab))
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    clip_tok = CLIPTokenizer(str(words / "vocab.json"), str(words / "merges.txt"), pad_token="<|endoftext|>",
                             model_max_length=77)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[("\u2581" + w, -1.0) for w in WORDS],
              *[(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]]
    t5 = Tokenizer(models.Unigram(pieces, unk_id=2))  # SentencePiece's model, as T5's tokenizer rebuilds it
    t5.pre_tokenizer = pre_tokenizers.Metaspace()
    t5.save(str(words / "t5.json"))
    t5_tok = T5TokenizerFast(tokenizer_file=str(words / "t5.json"), eos_token="</s>", pad_token="<pad>",
                             unk_token="<unk>", extra_ids=0)
    torch.manual_seed(2)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=arch.pooled_projection_dim,
                                        intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=77, eos_token_id=1, bos_token_id=0, pad_token_id=1))
    t5_model = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=arch.joint_attention_dim, d_kv=8, d_ff=32,
                                       num_layers=1, num_heads=2))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**model.scheduler), vae=adapter.vae,
                        text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5_model, tokenizer_2=t5_tok,
                        transformer=adapter.transformer)
    pipe.save_pretrained(folder / "flux")
    return folder / "flux"


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("weights"))


def test_a_saved_tiny_flux_loads_with_low_cpu_memory_and_no_accelerate_warning(flux_folder, caplog):
    import accelerate  # noqa: F401  (a dependency: without it diffusers loads every weight twice and warns)
    import diffusers

    diffusers.utils.logging.enable_propagation()  # diffusers' warnings reach caplog
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            adapter = build_adapter(tiny_flux_model_cfg(flux_folder), "cpu")
    finally:
        diffusers.utils.logging.disable_propagation()
    said = caplog.text + "\n".join(str(w.message) for w in caught)
    assert "accelerate" not in said and "low_cpu_mem_usage" not in said, said
    reference = build_adapter(tiny_flux_model_cfg(), "cpu").transformer.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in adapter.transformer.state_dict().items())
    embeds, pooled = adapter._prompt_embeddings(["a red car"])  # the pipeline's text encoders run
    assert embeds.shape == (1, 8, 32) and pooled.shape == (1, 16)


def _copy(flux_folder, tmp_path):
    import shutil

    return shutil.copytree(flux_folder, tmp_path / "flux")


def test_a_truncated_safetensors_file_is_corrupt_not_missing(flux_folder, tmp_path):
    folder = _copy(flux_folder, tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptFileError) as err:
        build_adapter(tiny_flux_model_cfg(folder), "cpu")
    message = str(err.value)
    assert str(folder / "transformer") in message and "exists but cannot be read" in message
    assert "diffusion_pytorch_model.safetensors" in message  # diffusers' own error names the file
    assert "not on this machine" not in message


def test_a_broken_config_json_is_corrupt_and_a_missing_encoder_is_missing(flux_folder, tmp_path):
    folder = _copy(flux_folder, tmp_path)
    (folder / "vae" / "config.json").write_text('{"in_channels": 3,')
    with pytest.raises(CorruptFileError, match=r"vae/config.json"):
        build_adapter(tiny_flux_model_cfg(folder), "cpu")
    import shutil

    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(MissingWeightsError, match=r"no text_encoder_2/config.json under") as err:
        build_adapter(tiny_flux_model_cfg(folder), "cpu")
    assert "model.path=" in str(err.value)
