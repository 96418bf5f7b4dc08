"""Builds an ImageReward checkpoint for tests, run with the ImageReward environment's python (`make env-imagereward`):

    .envs/imagereward/bin/python tests/build_image_reward.py OUT_DIR

Writes, with nothing downloaded:
- OUT_DIR/hf/hub/models--bert-base-uncased/...: a small BERT WordPiece vocabulary in the Hugging Face cache layout
  (BLIP loads `bert-base-uncased` by name; HF_HOME=OUT_DIR/hf points it there);
- OUT_DIR/med_config.json: BLIP's text-encoder config at one layer (hidden size 768, as ImageReward's head needs);
- OUT_DIR/ImageReward.pt: the package's own `ImageReward` model at random init, except its linear head, fitted by
  least squares to score clean colour images above noise-corrupted ones, saved as ImageReward's state dict (fp16).
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

WORDS = ["a", "photo", "of", "something", "red", "green", "blue", "yellow", "the", "an", "image", "dog", "cat"]


def write_tokenizer(hf_home: Path) -> None:
    snapshot = hf_home / "hub" / "models--bert-base-uncased" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [chr(c) for c in range(97, 123)]
    (snapshot / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert"}))
    refs = hf_home / "hub" / "models--bert-base-uncased" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text("0" * 40)
    return len(vocab)


def main(out: Path) -> None:
    os.environ["HF_HOME"] = str(out / "hf")
    os.environ["HF_HUB_OFFLINE"] = "1"
    vocab = write_tokenizer(out / "hf")
    med = out / "med_config.json"
    med.write_text(json.dumps({
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 768,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab + 2,
        "encoder_width": 1024, "add_cross_attention": True}))
    from PIL import Image

    from ImageReward.ImageReward import ImageReward

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from random_nets import colour_images

    torch.manual_seed(0)
    model = ImageReward(med_config=str(med), device="cpu").eval()
    clean, prompts = colour_images(3, size=64, seed=1)
    noisy = np.clip(clean + np.random.default_rng(2).normal(0, 80, clean.shape), 0, 255).astype(np.uint8)
    feats = []
    with torch.no_grad():
        for images in (clean, noisy):
            for image, prompt in zip(images, prompts):
                text = model.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35,
                                            return_tensors="pt")
                emb = model.blip.visual_encoder(model.preprocess(Image.fromarray(image)).unsqueeze(0))
                enc = model.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask,
                                              encoder_hidden_states=emb,
                                              encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long),
                                              return_dict=True)
                feats.append(enc.last_hidden_state[0, 0].double())
    x = torch.stack(feats)
    y = torch.tensor([1.0] * len(clean) + [-1.0] * len(noisy), dtype=torch.float64)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    w = torch.linalg.lstsq(design, y[:, None], driver="gelsd").solution[:, 0]  # minimum-norm fit
    # ImageReward's head is five Linear layers with no nonlinearity: route w . x + b through the first unit
    linears = [m for m in model.mlp.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.zero_()
            lin.bias.zero_()
            if i == 0:
                lin.weight[0] = w[:-1].float()
                lin.bias[0] = float(w[-1])
            else:
                lin.weight[0, 0] = 1.0
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
               out / "ImageReward.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
