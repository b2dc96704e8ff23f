"""A torch reference of LeRobot's SmolVLA on transformers' SmolVLM classes: LeRobot's module tree and maths.

Ported from lerobot `src/lerobot/policies/smolvla/modeling_smolvla.py` and `smolvlm_with_expert.py`
(Apache-2.0, HuggingFace), without lerobot itself (it pins another torch and transformers):

    SmolVLAPolicyTorch
      model (VLAFlowMatching)
        vlm_with_expert
          vlm        transformers.SmolVLMForConditionalGeneration, text layers cut to num_vlm_layers
          lm_expert  transformers.LlamaModel of the text config at expert_width_multiplier x the width
                     (embed_tokens removed; cross layers' k_proj / v_proj read the VLM's kv width)
        state_proj, action_in_proj, action_out_proj, action_time_mlp_in, action_time_mlp_out

so `state_dict()` names equal a LeRobot SmolVLA `model.safetensors` (the policy's `model.` prefix
included). `sample_actions(images, img_masks, lang_tokens, lang_masks, state, noise)` is LeRobot's
inference: the prefix pass fills a per-layer (k, v) cache, each Euler step runs `denoise_step`
(self-attention layers append the chunk's k/v to the prefix's for that step only, cross layers
read the prefix's). Images are [B, 3, H, W] in [0, 1] (LeRobot's prepare_images then maps them to
[-1, 1]; resizing is not ported: give the tower's size). The processor (tokenizer), RTC and the
Aloha adapters are not ported. `noise_head` is this project's Flow-Noise std network (not
LeRobot's), present only with `noise_head=True`, for the log-prob parity tests.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from jaxrl_vla.models.vla.smolvla import SmolVLAConfig, expert_intermediate_size


def apply_rope(x: Tensor, positions: Tensor, max_wavelength: float = 10_000) -> Tensor:
    """LeRobot's RoPE of x [B, L, H, D] at positions [B, L]."""
    d_half = x.shape[-1] // 2
    dtype = x.dtype
    x = x.to(torch.float32)
    freq_exponents = (2.0 / x.shape[-1]) * torch.arange(d_half, dtype=torch.float32, device=x.device)
    timescale = max_wavelength**freq_exponents
    radians = positions[..., None].to(torch.float32) / timescale[None, None, :].to(torch.float32)
    radians = radians[..., None, :]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = x.split(d_half, dim=-1)
    res = torch.empty_like(x)
    res[..., :d_half] = x1 * cos - x2 * sin
    res[..., d_half:] = x2 * cos + x1 * sin
    return res.to(dtype)


def create_sinusoidal_pos_embedding(time: Tensor, dimension: int, min_period: float, max_period: float) -> Tensor:
    """LeRobot's (openpi's) time embedding, in float64."""
    fraction = torch.linspace(0.0, 1.0, dimension // 2, dtype=torch.float64, device=time.device)
    period = min_period * (max_period / min_period) ** fraction
    scaling_factor = 1.0 / period * 2 * math.pi
    sin_input = time[..., None] * scaling_factor
    return torch.cat([torch.sin(sin_input), torch.cos(sin_input)], dim=-1)


def make_att_2d_masks(pad_masks: Tensor, att_masks: Tensor) -> Tensor:
    cumsum = torch.cumsum(att_masks, dim=1)
    att_2d_masks = cumsum[:, None, :] <= cumsum[:, :, None]
    pad_2d_masks = pad_masks[:, None, :] * pad_masks[:, :, None]
    return att_2d_masks & pad_2d_masks


def pad_vector(vector: Tensor, new_dim: int) -> Tensor:
    if vector.shape[-1] >= new_dim:
        return vector
    return F.pad(vector, (0, new_dim - vector.shape[-1]))


class SmolVLMWithExpertTorch(nn.Module):
    """LeRobot's SmolVLMWithExpertModel (random init from the VLM config; no processor)."""

    def __init__(self, cfg: SmolVLAConfig, vlm_config: dict[str, Any]):
        super().__init__()
        import transformers

        config = transformers.SmolVLMConfig.from_dict(dict(vlm_config))
        config._attn_implementation = "eager"
        self.vlm = transformers.SmolVLMForConditionalGeneration(config)
        text = self.vlm.model.text_model
        text.layers = text.layers[: cfg.layers]
        self.num_vlm_layers = len(text.layers)
        self.config = config
        expert_config = copy.deepcopy(config.text_config)
        hidden = expert_config.hidden_size
        expert_config.hidden_size = int(hidden * cfg.expert_width_multiplier)
        expert_config.intermediate_size = expert_intermediate_size(int(hidden * cfg.expert_width_multiplier))
        expert_config.num_hidden_layers = self.num_vlm_layers
        self.lm_expert = transformers.LlamaModel(expert_config)
        self.self_attn_every_n_layers = cfg.self_attn_every_n_layers
        self.attention_mode = cfg.attention_mode
        if "cross" in self.attention_mode:
            for i in range(len(self.lm_expert.layers)):
                if self.self_attn_every_n_layers > 0 and i % self.self_attn_every_n_layers == 0:
                    continue
                width = config.text_config.num_key_value_heads * config.text_config.head_dim
                out = expert_config.num_key_value_heads * expert_config.head_dim
                attn = self.lm_expert.layers[i].self_attn
                attn.k_proj = nn.Linear(width, out, bias=expert_config.attention_bias)
                attn.v_proj = nn.Linear(width, out, bias=expert_config.attention_bias)
        self.lm_expert.embed_tokens = None
        self.num_attention_heads = config.text_config.num_attention_heads
        self.num_key_value_heads = config.text_config.num_key_value_heads
        self.expert_hidden_size = expert_config.hidden_size

    def embed_image(self, image: Tensor) -> Tensor:
        hidden = self.vlm.model.vision_model(pixel_values=image, patch_attention_mask=None).last_hidden_state
        return self.vlm.model.connector(hidden)

    def embed_language_tokens(self, tokens: Tensor) -> Tensor:
        return self.vlm.model.text_model.get_input_embeddings()(tokens)

    def eager_attention_forward(self, attention_mask, batch_size, head_dim, q, k, v):
        groups = self.num_attention_heads // self.num_key_value_heads
        seq = k.shape[1]
        k = k[:, :, :, None, :].expand(batch_size, seq, self.num_key_value_heads, groups, head_dim)
        k = k.reshape(batch_size, seq, self.num_key_value_heads * groups, head_dim)
        v = v[:, :, :, None, :].expand(batch_size, seq, self.num_key_value_heads, groups, head_dim)
        v = v.reshape(batch_size, seq, self.num_key_value_heads * groups, head_dim)
        q, k = q.to(torch.float32).transpose(1, 2), k.to(torch.float32).transpose(1, 2)
        att = torch.matmul(q, k.transpose(2, 3)) * head_dim**-0.5
        att = torch.where(attention_mask[:, None, :, :], att, torch.finfo(att.dtype).min)
        probs = F.softmax(att, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        return out.reshape(batch_size, -1, self.num_key_value_heads * groups * head_dim)

    def _layers(self):
        return [list(self.vlm.model.text_model.layers), list(self.lm_expert.layers)]

    def forward_attn_layer(self, layers, inputs_embeds, idx, position_ids, attention_mask, batch_size, head_dim,
                           cache, fill):
        qs, ks, vs = [], [], []
        for i, hidden in enumerate(inputs_embeds):
            layer = layers[i][idx]
            if hidden is None:
                continue
            h = layer.input_layernorm(hidden)
            shape = (*h.shape[:-1], -1, layer.self_attn.head_dim)
            qs.append(layer.self_attn.q_proj(h).view(shape))
            ks.append(layer.self_attn.k_proj(h).view(shape))
            vs.append(layer.self_attn.v_proj(h).view(shape))
        q, k, v = torch.cat(qs, 1), torch.cat(ks, 1), torch.cat(vs, 1)
        q, k = apply_rope(q, position_ids), apply_rope(k, position_ids)
        if fill:
            cache[idx] = (k, v)
        else:  # the prefix's kv, then this step's (LeRobot's DynamicCache.update, cropped after the step)
            k, v = torch.cat([cache[idx][0], k], 1), torch.cat([cache[idx][1], v], 1)
        return [self.eager_attention_forward(attention_mask, batch_size, head_dim, q, k, v)]

    def forward_cross_attn_layer(self, layers, inputs_embeds, idx, position_ids, attention_mask, batch_size,
                                 head_dim, cache):
        k, v = cache[idx]
        layer = layers[1][idx]
        h = layer.input_layernorm(inputs_embeds[1])
        shape = (*h.shape[:-1], -1, layer.self_attn.head_dim)
        q = layer.self_attn.q_proj(h).view(shape)
        ek = layer.self_attn.k_proj(k.reshape(*k.shape[:2], -1)).view(*k.shape[:2], -1, layer.self_attn.head_dim)
        ev = layer.self_attn.v_proj(v.reshape(*v.shape[:2], -1)).view(*v.shape[:2], -1, layer.self_attn.head_dim)
        pos = position_ids - torch.min(position_ids, dim=1, keepdim=True).values
        mask = attention_mask[:, -inputs_embeds[1].shape[1]:, : ek.shape[1]]
        return [self.eager_attention_forward(mask, batch_size, head_dim, apply_rope(q, pos), ek, ev)]

    def forward(self, attention_mask, position_ids, cache, inputs_embeds, fill):
        """LeRobot's forward with use_cache=True: `fill` (the prefix pass) or a denoising pass over the chunk."""
        layers = self._layers()
        batch_size = next(h for h in inputs_embeds if h is not None).shape[0]
        head_dim = self.vlm.config.text_config.head_dim
        for idx in range(self.num_vlm_layers):
            if fill or "cross" not in self.attention_mode or (
                    self.self_attn_every_n_layers > 0 and idx % self.self_attn_every_n_layers == 0):
                att = self.forward_attn_layer(layers, inputs_embeds, idx, position_ids, attention_mask, batch_size,
                                              head_dim, cache, fill)
            else:
                att = self.forward_cross_attn_layer(layers, inputs_embeds, idx, position_ids, attention_mask,
                                                    batch_size, head_dim, cache)
            outputs, start = [], 0
            for i, hidden in enumerate(inputs_embeds):
                layer = layers[i][idx]
                if hidden is None:
                    outputs.append(None)
                    continue
                end = start + hidden.shape[1]
                out = layer.self_attn.o_proj(att[0][:, start:end]) + hidden
                outputs.append(layer.mlp(layer.post_attention_layernorm(out)) + out)
                start = end
            inputs_embeds = outputs
        models = [self.vlm.model.text_model, self.lm_expert]
        return [None if h is None else models[i].norm(h) for i, h in enumerate(inputs_embeds)]


class VLAFlowMatchingTorch(nn.Module):
    """LeRobot's VLAFlowMatching (inference path, use_cache=True)."""

    def __init__(self, cfg: SmolVLAConfig, vlm_config: dict[str, Any], noise_head: bool = False):
        super().__init__()
        self.cfg = cfg
        self.vlm_with_expert = SmolVLMWithExpertTorch(cfg, vlm_config)
        e = self.vlm_with_expert.expert_hidden_size
        self.state_proj = nn.Linear(cfg.max_state_dim, self.vlm_with_expert.config.text_config.hidden_size)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, e)
        self.action_out_proj = nn.Linear(e, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * e, e)
        self.action_time_mlp_out = nn.Linear(e, e)
        self._noise_head = nn.Linear(e, cfg.max_action_dim) if noise_head else None

    def embed_prefix(self, images, img_masks, lang_tokens, lang_masks, state):
        embs, pad_masks, att_masks = [], [], []
        for img, img_mask in zip(images, img_masks):
            img_emb = self.vlm_with_expert.embed_image(img)
            img_emb = img_emb * torch.tensor(img_emb.shape[-1] ** 0.5, dtype=img_emb.dtype)
            bsize, n = img_emb.shape[:2]
            embs.append(img_emb)
            pad_masks.append(img_mask[:, None].expand(bsize, n))
            att_masks += [0] * n
        lang_emb = self.vlm_with_expert.embed_language_tokens(lang_tokens)
        embs.append(lang_emb * math.sqrt(lang_emb.shape[-1]))
        pad_masks.append(lang_masks)
        att_masks += [0] * lang_emb.shape[1]
        state_emb = self.state_proj(state)[:, None, :]
        embs.append(state_emb)
        pad_masks.append(torch.ones(state_emb.shape[0], 1, dtype=torch.bool))
        att_masks += [1]
        embs, pad_masks = torch.cat(embs, 1), torch.cat(pad_masks, 1)
        att_masks = torch.tensor(att_masks, dtype=torch.bool)[None].expand(embs.shape[0], -1)
        return embs, pad_masks, att_masks

    def embed_suffix(self, noisy_actions, timestep):
        action_emb = self.action_in_proj(noisy_actions)
        time_emb = create_sinusoidal_pos_embedding(timestep, self.vlm_with_expert.expert_hidden_size,
                                                   self.cfg.min_period, self.cfg.max_period).type(action_emb.dtype)
        x = torch.cat([action_emb, time_emb[:, None, :].expand_as(action_emb)], dim=2)
        x = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(x)))
        bsize, n = x.shape[:2]
        pad = torch.ones(bsize, n, dtype=torch.bool)
        att = torch.ones(bsize, self.cfg.chunk_size, dtype=x.dtype)
        return x, pad, att

    def prefix(self, images, img_masks, lang_tokens, lang_masks, state):
        """(cache {layer: (k, v)}, prefix pad mask, final-normed prefix hidden)."""
        embs, pad, att = self.embed_prefix(images, img_masks, lang_tokens, lang_masks, state)
        cache: dict[int, tuple[Tensor, Tensor]] = {}
        out = self.vlm_with_expert.forward(make_att_2d_masks(pad, att), torch.cumsum(pad, 1) - 1, cache,
                                           [embs, None], fill=True)
        return cache, pad, out[0]

    def denoise_step(self, prefix_pad_masks, cache, x_t, timestep, return_hidden: bool = False):
        suffix_embs, suffix_pad, suffix_att = self.embed_suffix(x_t, timestep)
        b, tp, ts = prefix_pad_masks.shape[0], prefix_pad_masks.shape[1], suffix_pad.shape[1]
        full = torch.cat([prefix_pad_masks[:, None, :].expand(b, ts, tp), make_att_2d_masks(suffix_pad, suffix_att)], 2)
        positions = torch.sum(prefix_pad_masks, dim=-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
        out = self.vlm_with_expert.forward(full, positions, cache, [None, suffix_embs], fill=False)[1]
        out = out[:, -self.cfg.chunk_size:].to(torch.float32)
        v = self.action_out_proj(out)
        return (v, out) if return_hidden else v

    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise):
        """LeRobot's euler_integrate from `noise` (t = 1) to t = 0 in num_steps steps."""
        cache, pad, _ = self.prefix(images, img_masks, lang_tokens, lang_masks, state)
        dt = -1.0 / self.cfg.num_steps
        x_t = noise
        for step in range(self.cfg.num_steps):
            t = torch.tensor(1.0 + step * dt, dtype=torch.float32).expand(noise.shape[0])
            x_t = x_t + dt * self.denoise_step(pad, cache, x_t, t)
        return x_t


class SmolVLAPolicyTorch(nn.Module):
    """LeRobot's SmolVLAPolicy shell: `model` (so the state_dict keys start with `model.`)."""

    def __init__(self, cfg: SmolVLAConfig, vlm_config: dict[str, Any], noise_head: bool = False):
        super().__init__()
        self.model = VLAFlowMatchingTorch(cfg, vlm_config, noise_head)

    def lerobot_state_dict(self) -> dict[str, Tensor]:
        """The state_dict without this project's noise head: what LeRobot's model.safetensors holds."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model._noise_head.")}


# ----------------------------------------------------------------------------- a LeRobot directory of it


def lerobot_config(vlm_dir: str, *, state_dim: int = 2, action_dim: int = 2, image_size: int = 64,
                   chunk_size: int = 4, n_action_steps: int = 2, max_state_dim: int = 8, max_action_dim: int = 8,
                   num_steps: int = 4, num_vlm_layers: int = 2, self_attn_every_n_layers: int = 2,
                   expert_width_multiplier: float = 0.75, state_mode: str = "MEAN_STD",
                   action_mode: str = "MEAN_STD") -> dict[str, Any]:
    """A LeRobot SmolVLA config.json dict (the SmolVLAConfig fields draccus writes) for a small policy."""
    return {
        "type": "smolvla", "n_obs_steps": 1,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": state_mode, "ACTION": action_mode},
        "input_features": {"observation.images.top": {"type": "VISUAL", "shape": [3, image_size, image_size]},
                           "observation.state": {"type": "STATE", "shape": [state_dim]}},
        "output_features": {"action": {"type": "ACTION", "shape": [action_dim]}},
        "device": "cpu", "use_amp": False, "push_to_hub": False, "repo_id": None, "private": None, "tags": None,
        "license": None, "chunk_size": chunk_size, "n_action_steps": n_action_steps, "max_state_dim": max_state_dim,
        "max_action_dim": max_action_dim, "resize_imgs_with_padding": [image_size, image_size], "empty_cameras": 0,
        "adapt_to_pi_aloha": False, "use_delta_joint_actions_aloha": False, "tokenizer_max_length": 48,
        "num_steps": num_steps, "use_cache": True, "freeze_vision_encoder": True, "train_expert_only": True,
        "train_state_proj": True, "optimizer_lr": 1e-4, "optimizer_betas": [0.9, 0.95], "optimizer_eps": 1e-8,
        "optimizer_weight_decay": 1e-10, "optimizer_grad_clip_norm": 10, "scheduler_warmup_steps": 1000,
        "scheduler_decay_steps": 30000, "scheduler_decay_lr": 2.5e-6, "vlm_model_name": str(vlm_dir),
        "load_vlm_weights": False, "add_image_special_tokens": False, "attention_mode": "cross_attn",
        "prefix_length": -1, "pad_language_to": "longest", "num_expert_layers": -1, "num_vlm_layers": num_vlm_layers,
        "self_attn_every_n_layers": self_attn_every_n_layers, "expert_width_multiplier": expert_width_multiplier,
        "min_period": 4e-3, "max_period": 4.0, "rtc_config": None, "compile_model": False,
        "compile_mode": "max-autotune",
    }


def _stat_tensors(config: dict[str, Any], stats: dict[str, dict[str, Any]], keys: list[str]) -> dict[str, Tensor]:
    return {f"{k}.{s}": torch.as_tensor(v, dtype=torch.float32) for k in keys if k in stats
            for s, v in stats[k].items()}


def save_lerobot(policy: SmolVLAPolicyTorch, out: str, config: dict[str, Any], stats: dict[str, dict[str, Any]],
                 layout: str = "processor") -> str:
    """Write `policy` as LeRobot does: config.json, model.safetensors (safetensors' save_file of the state_dict)
    and `stats` ({feature: {stat: array}}) as processor files ("processor") or model buffers ("buffers")."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=4)
    tensors = {k: v.detach().contiguous() for k, v in policy.lerobot_state_dict().items()}
    if layout == "buffers":
        for prefix, features in (("normalize_inputs", ["observation.state"]), ("normalize_targets", ["action"]),
                                 ("unnormalize_outputs", ["action"])):
            for k in features:
                for s, v in stats.get(k, {}).items():
                    tensors[f"{prefix}.buffer_{k.replace('.', '_')}.{s}"] = torch.as_tensor(v, dtype=torch.float32)
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return out
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    features = {**config["input_features"], **config["output_features"]}
    norm = {"eps": 1e-8, "features": features, "norm_map": config["normalization_mapping"]}
    pre_state = "policy_preprocessor_step_5_normalizer_processor.safetensors"
    post_state = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    pre = {"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "smolvla_new_line_processor", "config": {}},
        {"registry_name": "tokenizer_processor", "config": {
            "max_length": config["tokenizer_max_length"], "task_key": "task", "padding_side": "right",
            "padding": config["pad_language_to"], "truncation": True, "tokenizer_name": config["vlm_model_name"]}},
        {"registry_name": "device_processor", "config": {"device": config["device"], "float_dtype": None}},
        {"registry_name": "normalizer_processor", "config": norm, "state_file": pre_state}]}
    post = {"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor",
         "config": {"eps": 1e-8, "features": config["output_features"], "norm_map": config["normalization_mapping"]},
         "state_file": post_state},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}
    for name, content in (("policy_preprocessor.json", pre), ("policy_postprocessor.json", post)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(content, f, indent=2)
    save_file(_stat_tensors(config, stats, list(features)), os.path.join(out, pre_state))
    save_file(_stat_tensors(config, stats, list(config["output_features"])), os.path.join(out, post_state))
    return out
