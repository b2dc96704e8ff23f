"""The torch twin of `GaussianVLA` on transformers' own `SmolVLMForConditionalGeneration` (behaviour cloning).

The same maths as jaxrl_vla/models/vla/gaussian_vla.py, computed by transformers' modules: the
sequence [image tokens, instruction (right-padded), proprio token] goes through HF's SmolVLMModel
(`inputs_embeds` = the text embeddings with `proprio_proj(proprio)` appended; HF puts the image
features where the image-token embeddings are), the readout is the final hidden state at the last
real position, and `action_mean` / `log_std` / `value_head` read it. The head's parameter names
are those `GaussianVLA.head_params` loads from `action_head.safetensors`, so a head cloned here
is the head PPO fine-tunes.
"""

from __future__ import annotations

from typing import Any

import torch

from jaxrl_vla.models.vla.gaussian_vla import HEAD_MODULES


def image_seq_len(config: Any) -> int:
    """Image tokens per image of a SmolVLM config (patches after the connector's pixel shuffle)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2


class SmolVLMGaussianVLA(torch.nn.Module):
    """`vlm` (SmolVLMForConditionalGeneration) + proprio token + Gaussian action-chunk head + value head."""

    def __init__(self, vlm: Any, proprio_dim: int, action_dim: int, chunk: int = 1, init_log_std: float = 0.0):
        super().__init__()
        width = vlm.config.text_config.hidden_size
        self.vlm, self.chunk, self.action_dim = vlm, chunk, action_dim
        self.proprio_proj = torch.nn.Linear(proprio_dim, width) if proprio_dim > 0 else None
        self.action_mean = torch.nn.Linear(width, chunk * action_dim)
        self.value_head = torch.nn.Linear(width, 1)
        for layer in (self.action_mean, self.value_head):  # GaussianVLA's init: small weights, zero bias
            torch.nn.init.normal_(layer.weight, std=0.01)
            torch.nn.init.zeros_(layer.bias)
        self.log_std = torch.nn.Parameter(torch.full((action_dim,), float(init_log_std)))

    def features(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The readout [B, E] from obs {"rgb" uint8 [B, H, W, 3], "language" [B, T], "language_mask", "proprio"}."""
        config = self.vlm.config
        ids, mask = obs["language"].long(), obs["language_mask"].long()
        batch, count = ids.shape[0], image_seq_len(config)
        ids = torch.cat([torch.full((batch, count), config.image_token_id, dtype=torch.long), ids], dim=1)
        mask = torch.cat([torch.ones(batch, count, dtype=torch.long), mask], dim=1)
        embeds = self.vlm.model.get_input_embeddings()(ids)
        if self.proprio_proj is not None:
            embeds = torch.cat([embeds, self.proprio_proj(obs["proprio"].float())[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
        pixels = (obs["rgb"].float() / 255.0 - 0.5) / 0.5
        pixels = pixels.permute(0, 3, 1, 2)[:, None]  # one image per row, channels first
        hidden = self.vlm.model(inputs_embeds=embeds, attention_mask=mask, pixel_values=pixels).last_hidden_state
        last = mask.shape[1] - 1 - torch.argmax(torch.flip(mask, dims=[1]), dim=1)
        return hidden[torch.arange(batch), last]

    def heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(action means [B, A] or [B, H, A], value [B])."""
        mean = self.action_mean(h)
        if self.chunk > 1:
            mean = mean.reshape(mean.shape[0], self.chunk, self.action_dim)
        return mean, self.value_head(h)[:, 0]

    def forward(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.features(obs))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The head's tensors under GaussianVLA's torch names (what `action_head.safetensors` holds)."""
        out = {"log_std": self.log_std.detach().clone()}
        for name in HEAD_MODULES:
            layer = getattr(self, name)
            if layer is not None:
                out[f"{name}.weight"] = layer.weight.detach().clone().contiguous()
                out[f"{name}.bias"] = layer.bias.detach().clone()
        return out
