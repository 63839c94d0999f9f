"""A full-size CLIP ViT-B/32 built offline: `CLIPConfig()` shapes with random weights (the real model's cost) and
the real 49,408-token CLIP BPE tokenizer rebuilt from the merges file inside the open-clip-torch wheel (fetched
with `pip download --no-deps`, never installed: it would pull torchvision). Laid out like
`openai/clip-vit-base-patch32`, so it goes through Loupe's real loading path: 77-token truncation, the real special
ids, end-of-text pooling."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from loupe.models.tiny_clip import bytes_to_unicode  # GPT-2/CLIP's byte -> unicode map

CACHE = Path.home() / ".cache" / "loupe" / "bench"
MODEL_DIR = CACHE / "clip-vit-b-32-random"


def bpe_merges() -> list[str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("open_clip_torch-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "open-clip-torch", "-d", str(CACHE)],
            check=True,
            capture_output=True,
        )
        wheels = sorted(CACHE.glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf:
        raw = zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    return lines[1 : 49152 - 256 - 2 + 1]  # CLIP keeps the first 48,894 merges


def write_tokenizer(out: Path) -> None:
    merges = bpe_merges()
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build(out: Path = MODEL_DIR) -> Path:
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    tmp = out.with_name(out.name + ".tmp")
    write_tokenizer(tmp)
    tok = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token="<|endoftext|>")
    ids = tok("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    torch.manual_seed(0)
    cfg = CLIPConfig()
    cfg.text_config.eos_token_id = 2  # as in the original checkpoint: pool at the argmax id, <|endoftext|>
    CLIPModel(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    CLIPImageProcessorPil(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        do_convert_rgb=True,
    ).save_pretrained(tmp)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build())
