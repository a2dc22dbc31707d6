"""A small vision-language model: ViT encoder -> projector -> causal transformer decoder.

The image becomes a prefix of patch tokens; the decoder predicts the caption one word at a
time, and the loss is next-token cross-entropy on the caption only.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from raytrain_spot.tasks.vlm.config import ModelConfig


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float, causal: bool):
        super().__init__()
        self.num_heads = num_heads
        self.causal = causal
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=2)
        q, k, v = (t.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.resid_dropout(self.proj(attn.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.resid_dropout(self.mlp(self.norm2(x)))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, cfg.vision_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.pos = nn.Parameter(torch.zeros(1, num_patches, cfg.vision_dim))
        self.blocks = nn.ModuleList(
            Block(cfg.vision_dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, causal=False)
            for _ in range(cfg.vision_layers)
        )
        self.norm = nn.LayerNorm(cfg.vision_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class VisionLanguageModel(nn.Module):
    """Captions images. ``forward`` returns the mean next-token loss of each sample."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, max_caption_tokens: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.vision = VisionEncoder(cfg)
        self.projector = nn.Sequential(
            nn.Linear(cfg.vision_dim, cfg.text_dim), nn.GELU(), nn.Linear(cfg.text_dim, cfg.text_dim)
        )
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.token_embed = nn.Embedding(vocab_size, cfg.text_dim)
        self.pos = nn.Parameter(torch.zeros(1, num_patches + max_caption_tokens, cfg.text_dim))
        self.blocks = nn.ModuleList(
            Block(cfg.text_dim, cfg.num_heads, cfg.mlp_ratio, cfg.dropout, causal=True)
            for _ in range(cfg.text_layers)
        )
        self.norm = nn.LayerNorm(cfg.text_dim)
        self.lm_head = nn.Linear(cfg.text_dim, vocab_size, bias=False)
        self.lm_head.weight = self.token_embed.weight
        self.apply(_init_weights)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.vision.pos, std=0.02)

    def caption_logits(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits predicting tokens[:, 1:] from the image and tokens[:, :-1]."""
        prefix = self.projector(self.vision(images))
        x = torch.cat([prefix, self.token_embed(tokens[:, :-1])], dim=1)
        x = x + self.pos[:, : x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x[:, prefix.shape[1]:]))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.caption_logits(images, tokens)
        targets = tokens[:, 1:]
        token_loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=self.pad_id, reduction="none",
        ).view(targets.shape)
        mask = (targets != self.pad_id).float()
        return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)

