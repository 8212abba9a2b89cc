"""What the tests of HybridEWC in a transformers.Trainer share (tests/test_integrations.py, tests/test_optim.py): a
tiny language-modelling data set, a tiny Llama after a simulated IFA stage, the Trainer's arguments, and the
reference trainer that adds the penalty as a loss term."""
from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from hbat import HybridEWC
from hf_fixtures import tiny_llama

TEXTS = ["q1: abc", "q2: hello there", "q3: a b c d", "q4: zzz", "q5: the end.", "q6: xyz 123", "q7: ok", "q8: no"]


def lm_dataset(tokenizer, length=16):
    rows = []
    for text in TEXTS:
        ids = tokenizer(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        input_ids, mask = ids["input_ids"][0], ids["attention_mask"][0]
        rows.append({"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)})
    return rows


def model_after_ifa(tokenizer, f_max=1000.0):
    """A tiny Llama and a HybridEWC that has seen one (simulated) IFA stage, so the next stage is penalised."""
    model = tiny_llama(tokenizer, seed=0)
    ewc = HybridEWC(model, f_max=f_max, lam=1.0)
    ewc.begin_stage("ifa")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 1e-3 * (1 + i % 5))  # different change per tensor
    return model, ewc


def training_args(out, **overrides):
    kwargs = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4,
                  learning_rate=3e-3, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.1,
                  logging_steps=2, save_strategy="no", report_to="none", seed=0, use_cpu=True, disable_tqdm=True,
                  dataloader_num_workers=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class PenaltyInLossTrainer(Trainer):
    """The reference: ewc.penalty() as a loss term, so autograd, clipping and AdamW see it like any loss."""

    def __init__(self, *args, ewc, **kwargs):
        super().__init__(*args, **kwargs)
        self.ewc = ewc

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        # once per optimizer step in total: Trainer divides each micro-batch loss by the accumulation steps
        # unless the loss was already normalised over the whole step
        share = 1.0 / self.current_gradient_accumulation_steps if scaled_for_ga else 1.0
        return loss + share * self.ewc.penalty()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}
