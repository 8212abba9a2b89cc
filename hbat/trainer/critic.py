"""The PPO critic: a value model with one value per token, started from the reward model (its backbone and
head, so the first values are the reward model's score of each prefix) and carried from one HPA stage to the
next, as in the paper."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..data import position_ids_from_mask
from .models import prepare_trainee
from .reward import RetokenizedRewardModel, RewardModel
from .rollout import Rollout


class Critic(nn.Module):
    """Value model: a backbone and a scalar head giving one value per token ([B, L], float32).

    ``from_reward_model`` copies the reward model's backbone and head, so the first values are the reward
    model's score of each prefix. ``steps_trained`` (a buffer, saved in the state dict) counts the PPO steps
    the critic has been trained, for the cold start.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("steps_trained", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_reward_model(cls, rm: RewardModel) -> "Critic":
        return cls(copy.deepcopy(rm.backbone), copy.deepcopy(rm.head))

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.head(hidden).squeeze(-1).float()

def response_values(critic: Critic, rollout: Rollout) -> torch.Tensor:
    """V(prefix before response token t) [B, Lr]."""
    values = critic(rollout.input_ids, rollout.attention_mask)
    return values[:, rollout.query_len - 1:-1]


def new_critic(ws, cfg):
    """The PPO critic: the reward model's backbone and head (copies), or, for a reward model with a tokenizer
    of its own, the SFT model's backbone with a fresh head; gradient checkpointing and LoRA as configured."""
    start = ws.reward_model
    if isinstance(start, RetokenizedRewardModel):  # its token ids are not the policy's
        start = RewardModel.from_causal_lm(ws.sft_model)
    critic = Critic.from_reward_model(start).to(ws.device).requires_grad_(True)
    critic.backbone = prepare_trainee(critic.backbone, cfg.model, seed=cfg.seed, task_type=None)
    return critic
