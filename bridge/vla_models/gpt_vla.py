"""GPTVLAModel in torch: what a VLA team ships, built on transformers' GPT2Model and ResNetModel.

It is the reference implementation of the Flax `jaxrl_vla.models.vla.GPTVLAModel`
(same module names, same config keys, same maths; see that module's docstring
for the architecture and the reasons behind it). The config class is shared
with the Flax side so the two can never disagree about what a key means.

Interface (the seed's VLAModelInterface):
    forward(obs) -> action means [B, A] (or [B, H, A] for chunks)
    get_value(obs) -> [B, 1]
    evaluate_actions(obs, actions) -> (log_prob [B], entropy [B])
    action_distribution(obs) -> torch.distributions.Normal
`obs` is a TensorDict (or any mapping) with "rgb" uint8 [B,H,W,3], optional
"depth" float32 [B,H,W,1], "proprio" float32 [B,P], "language" int [B,L] and
"language_mask" bool [B,L].
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from transformers import GPT2Config as HFGPT2Config
from transformers import GPT2Model, ResNetConfig as HFResNetConfig, ResNetModel

from jaxrl_vla.models.vla.gpt_vla import VLAModelConfig


def _has(obs: Any, key: str) -> bool:
    """Key membership that works for dicts and TensorDicts alike."""
    return key in obs.keys()


def pixels_from_obs(obs: Any, use_depth: bool) -> torch.Tensor:
    """NCHW float pixels: rgb [B,H,W,3] scaled to [0, 1] (if integer), depth appended if used."""
    rgb = obs["rgb"]
    pixels = rgb.float() / 255.0 if not torch.is_floating_point(rgb) else rgb.float()
    if use_depth:
        if not _has(obs, "depth"):
            raise KeyError("use_depth=True but the observation has no 'depth'")
        pixels = torch.cat([pixels, obs["depth"].float()], dim=-1)
    return pixels.permute(0, 3, 1, 2)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last True entry of each row of a [B, T] mask."""
    length = mask.shape[1]
    return length - 1 - torch.argmax(torch.flip(mask, dims=[1]).int(), dim=1)


class GPTVLAModel(nn.Module):
    """ResNet + GPT-2 VLA with a Gaussian action head and a value head.

    Build with a model_config mapping and/or keyword overrides:
    `GPTVLAModel({"vision_encoder": "resnet50", "language_model": "gpt2-medium"})`
    or `GPTVLAModel(vision_encoder="tiny", language_model="tiny")`; unknown keys
    raise `VLAConfigError`. Weights are randomly initialised (load a state_dict).
    Dropout is off, and the ResNet's BatchNorm layers stay in eval mode even in
    `train()`, matching the Flax twin (small RL batches would corrupt them).
    """

    def __init__(self, model_config: Mapping[str, Any] | VLAModelConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = VLAModelConfig.from_dict(model_config, **overrides)
        self.config = cfg
        resnet_cfg, gpt_cfg = cfg.resnet_config(), cfg.gpt2_config()
        self.vision = ResNetModel(HFResNetConfig(**resnet_cfg.to_hf_kwargs()))
        self.language = GPT2Model(HFGPT2Config(**gpt_cfg.to_hf_kwargs()))
        self.image_proj = nn.Linear(resnet_cfg.output_dim, gpt_cfg.n_embd)
        if cfg.proprio_dim > 0:
            self.proprio_proj = nn.Linear(cfg.proprio_dim, gpt_cfg.n_embd)
        self.action_mean = nn.Linear(gpt_cfg.n_embd, cfg.action_dim * cfg.action_chunk)
        self.value_fc = nn.Linear(gpt_cfg.n_embd, cfg.value_hidden_dim)
        self.value_out = nn.Linear(cfg.value_hidden_dim, 1)
        self.log_std = nn.Parameter(torch.full((cfg.action_dim,), float(cfg.init_log_std)))
        if cfg.freeze_vision_encoder:
            self.vision.requires_grad_(False)
        if cfg.freeze_language_model:
            self.language.requires_grad_(False)
        self.train(self.training)  # a fresh module is in training mode: put BatchNorm on running stats now

    def train(self, mode: bool = True) -> "GPTVLAModel":
        """Switch modes but keep BatchNorm on its running statistics (see class docstring)."""
        super().train(mode)
        for module in self.vision.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def features(self, obs: Any) -> torch.Tensor:
        """The GPT-2 hidden state [B, E] at the last valid token of [img..., proprio, lang...] (or [lang..., img..., proprio])."""
        cfg = self.config
        vision = self.vision(pixel_values=pixels_from_obs(obs, cfg.use_depth))
        if cfg.image_tokens == "spatial":
            image = vision.last_hidden_state.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h*w, C], row-major
        else:
            image = vision.pooler_output.flatten(1)[:, None]
        batch = image.shape[0]
        tokens = [self.image_proj(image)]
        if cfg.proprio_dim > 0:
            tokens.append(self.proprio_proj(obs["proprio"].float())[:, None])
        masks = [torch.ones(batch, cfg.num_prefix_tokens, dtype=torch.bool, device=image.device)]
        if _has(obs, "language"):
            ids = obs["language"].long()
            lang_mask = (
                obs["language_mask"].bool() if _has(obs, "language_mask") else torch.ones_like(ids, dtype=torch.bool)
            )
            if cfg.token_order == "instruction_first":  # [lang, img, proprio]; slot 0 always attended (see the Flax twin)
                lang_mask = lang_mask.clone()
                lang_mask[:, 0] = True
                tokens, masks = [self.language.wte(ids)] + tokens, [lang_mask] + masks
            else:
                tokens, masks = tokens + [self.language.wte(ids)], masks + [lang_mask]
        seq, mask = torch.cat(tokens, dim=1), torch.cat(masks, dim=1)
        hidden = self.language(inputs_embeds=seq, attention_mask=mask.long()).last_hidden_state
        return hidden[torch.arange(batch, device=hidden.device), last_valid_index(mask)]

    def _heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(action means [B, A] or [B, H, A], value [B, 1])."""
        cfg = self.config
        mean = self.action_mean(h)
        if cfg.action_chunk > 1:
            mean = mean.view(mean.shape[0], cfg.action_chunk, cfg.action_dim)
        return mean, self.value_out(torch.tanh(self.value_fc(h)))

    def forward(self, obs: Any) -> torch.Tensor:
        """Deterministic actions: the Gaussian means."""
        return self._heads(self.features(obs))[0]

    def get_value(self, obs: Any) -> torch.Tensor:
        """Value estimates [B, 1]."""
        return self._heads(self.features(obs))[1]

    def action_distribution(self, obs: Any) -> torch.distributions.Normal:
        """Per-dimension Normal over actions (batch shape [B, A] or [B, H, A])."""
        mean = self.forward(obs)
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))

    def evaluate_actions(self, obs: Any, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_prob [B], entropy [B]), summed over action dims (and over the chunk if H > 1)."""
        dist = self.action_distribution(obs)
        dims = tuple(range(1, dist.mean.dim()))
        return dist.log_prob(actions).sum(dim=dims), dist.entropy().sum(dim=dims)
