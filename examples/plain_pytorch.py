"""HybridEWC in a plain PyTorch loop: Algorithm 1 of HBAT, alternating an SFT stage and a preference stage.

    python examples/plain_pytorch.py --rounds 2 --steps 20

A tiny Llama (random weights, from a LlamaConfig) and a character vocabulary made on the spot: no download,
a few seconds on the CPU. The SFT stage ("ifa") teaches answers by maximum likelihood, the preference stage
("hpa") prefers answers of "a"s to answers of "b"s with a DPO-like logistic loss (no reference model, to
stay short). HybridEWC keeps each stage near where the other objective left the weights.
"""
import argparse

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import hbat
from hbat.importance import importance_entropy

VOCAB = "\0abcdefghijklmnopqrstuvwxyz0123456789 :?"  # id 0 pads
SFT_DATA = [(f"q{i}:", answer) for i, answer in enumerate([" yes", " no", " hello", " ok"] * 4)]
PREFERENCE_DATA = [(f"q{i}:", " " + "a" * (1 + i % 3), " " + "b" * (1 + i % 4)) for i in range(16)]


def answer_logprob(model, prompts, answers):
    """sum_t log p(answer_t | prompt, answer_<t) for each pair (right padding, prompt tokens masked)."""
    rows = [[VOCAB.index(c) for c in p + a] for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    is_answer = torch.tensor([[len(p) <= t < len(p) + len(a) for t in range(width)] for p, a in zip(prompts, answers)])
    logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * is_answer[:, 1:]).sum(-1)


def sft_loss(model, batch):
    prompts, answers = zip(*batch)
    return -answer_logprob(model, prompts, answers).mean()


def preference_loss(model, batch, beta=0.5):
    prompts, chosen, rejected = zip(*batch)
    margin = answer_logprob(model, prompts, chosen) - answer_logprob(model, prompts, rejected)
    return -F.logsigmoid(beta * margin).mean()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="N of Algorithm 1 (one SFT + one preference stage each)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per stage")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--f-max", type=float, default=100.0)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64, pad_token_id=0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ewc = hbat.HybridEWC(model, f_max=args.f_max, lam=args.lam)
    stages = [("ifa", sft_loss, SFT_DATA), ("hpa", preference_loss, PREFERENCE_DATA)]

    for round_ in range(1, args.rounds + 1):
        for objective, loss_fn, data in stages:
            ewc.begin_stage(objective)  # C of the stage that ended, anchor <- weights, F of the other objective
            penalties = []
            for step in range(args.steps):
                batch = [data[(step * args.batch_size + k) % len(data)] for k in range(args.batch_size)]
                loss = loss_fn(model, batch)
                loss.backward()
                penalties.append(ewc.apply_())  # penalty gradient into .grad: after backward, before clipping
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            penalty = torch.stack(penalties)  # one host sync per stage, for printing
            print(f"round {round_} {objective}: loss {loss.item():.4f}  ewc/penalty mean {penalty.mean():.3e} "
                  f"last {penalty[-1]:.3e}  active {ewc.active}  "
                  f"importance_entropy {importance_entropy(ewc.importance):.3f}")
    ewc.end_stage()
    return ewc


if __name__ == "__main__":
    main()
