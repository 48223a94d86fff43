"""Tiny randomly initialised models of each family the product loads.

Each builder writes a model to a folder in the format its library saves
(``save_pretrained`` / open_clip's hub layout), so tests load it through the
same public path a user's real weights take (``fairbalance.core.models``).
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile

import torch

TINY_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

CAPTION_WORDS = (
    "a an the of in on with and photo picture digit number red green blue yellow orange purple "
    "cyan magenta lime teal black white background small large person young old man woman "
    "sweater pink handwritten colored bright dark zero one two three four five six seven eight nine"
).split()


def build_open_clip(path: str, seed: int = 0, embed_dim: int | None = None) -> str:
    """A tiny ViT CLIP in open_clip's ``local-dir:`` layout; returns the model name to load.

    ``embed_dim``: the output size (default 16; the benchmarks use ViT-B-32's 512).
    """
    import open_clip

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    cfg = {**TINY_CLIP_CFG, "embed_dim": embed_dim or TINY_CLIP_CFG["embed_dim"]}
    model = open_clip.CLIP(**cfg)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}, f)
    torch.save(model.state_dict(), os.path.join(path, "open_clip_pytorch_model.bin"))
    return f"local-dir:{path}"


def build_open_clip_checkpoint(path: str, seed: int = 0) -> str:
    """The same tiny CLIP as a plain checkpoint file (for ``pretrained=<file>``)."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    torch.save(model.state_dict(), path)
    return path


def build_blip(path: str, seed: int = 0) -> str:
    """A tiny BLIP image-captioning model + processor via ``save_pretrained``."""
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *CAPTION_WORDS]
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary as ``vocab`` (``vocab_file`` is ignored there: an empty vocabulary
    # whose captions all decode to ""), 4.x as ``vocab_file``
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    else:
        tokenizer = BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    size = 32
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tokenizer
    )
    config = BlipConfig(
        vision_config={
            "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": size, "patch_size": 8,
        },
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 1, "num_attention_heads": 2, "encoder_hidden_size": 32,
            "max_position_embeddings": 64, "bos_token_id": vocab.index("[DEC]"),
            "pad_token_id": 0, "sep_token_id": vocab.index("[SEP]"), "eos_token_id": vocab.index("[SEP]"),
        },
        projection_dim=16,
    )
    BlipForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_ddpm_pipeline(path: str, seed: int = 0, sample_size: int = 16, num_class_embeds: int | None = None) -> str:
    """A tiny unconditional (or class-conditional) ``UNet2DModel`` DDPM pipeline."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, num_class_embeds=num_class_embeds,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(path)
    return path


def _byte_level_clip_tokenizer(path: str):
    """A CLIP BPE tokenizer whose vocabulary is the 256 byte symbols (no merges)."""
    from transformers import CLIPTokenizer

    # GPT-2/CLIP byte-to-symbol table: printable bytes map to themselves, the rest to 256+.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), model_max_length=77
    )
    return tokenizer, len(vocab)


def build_stable_diffusion(path: str, seed: int = 0) -> str:
    """A tiny Stable Diffusion pipeline (UNet2DConditionModel + VAE + CLIP text encoder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="tiny-clip-tok-") as tok_dir:  # read at once; saved with the pipeline
        tokenizer, vocab_size = _byte_level_clip_tokenizer(tok_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=16,
    )
    scheduler = DDIMScheduler(num_train_timesteps=50, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path
