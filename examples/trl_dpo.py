"""HBAT with TRL: alternate SFTTrainer ("ifa") and DPOTrainer ("hpa") stages, with HybridEWCCallback.

    python examples/trl_dpo.py --rounds 1 --steps 10
    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 examples/trl_dpo.py --deepspeed examples/ds_zero3.json --output-dir out

One HybridEWC follows the model through every stage; each trainer gets a HybridEWCCallback naming its
objective, which starts the stage (Algorithm 1: measure the change of the stage that ended, refresh the
anchor, take the importance of the other objective), adds the penalty gradient before gradient clipping
once per optimizer step, logs ``ewc/penalty`` and ``ewc/importance_entropy``, and saves ``hbat_ewc.pt`` in
every checkpoint (per rank under DeepSpeed: each rank's anchor partition). Under DeepSpeed the callback binds
the HybridEWC to each trainer's new engine when ``train()`` starts, and ``release_trainer`` frees a finished
trainer's engine so that the next one can start in the same process. A tiny Llama and a character tokenizer
are made on the spot: no download, CPU only.
"""
import argparse
import os
import tempfile

import torch


def char_tokenizer():
    """A character-level tokenizer made locally: <pad>=0, <s>=1 (prepended), </s>=2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?\n"))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="N of Algorithm 1 (one SFT + one DPO stage each)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per stage")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--f-max", type=float, default=100.0)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--output-dir", default=None, help="checkpoints go here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON config (run under torchrun)")
    args = parser.parse_args(argv)
    if args.deepspeed and not args.output_dir:
        parser.error("--deepspeed needs --output-dir: one folder that every rank writes to and reads from")
    if args.deepspeed:
        from hbat.trainer.engine import init_distributed

        init_distributed()  # the process group of torchrun (gloo on CPU ranks)

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from hbat import HybridEWC
    from hbat.integrations.transformers import HybridEWCCallback, release_trainer

    tokenizer = char_tokenizer()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    sft_data = Dataset.from_list([{"prompt": f"q{i}:", "completion": answer}
                                  for i, answer in enumerate([" yes", " no", " hello", " ok"] * 4)])
    dpo_data = Dataset.from_list([{"prompt": f"q{i}:", "chosen": " " + "a" * (1 + i % 3),
                                   "rejected": " " + "b" * (1 + i % 4)} for i in range(16)])

    ewc = HybridEWC(model, f_max=args.f_max, lam=args.lam)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="hbat_trl_")
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=args.steps,
                  learning_rate=args.lr, max_grad_norm=1.0, logging_steps=max(1, args.steps // 2),
                  save_steps=args.steps, report_to="none", use_cpu=True, disable_tqdm=True, max_length=32,
                  seed=args.seed, deepspeed=args.deepspeed)
    rank = int(os.environ.get("RANK", "0"))
    for round_ in range(1, args.rounds + 1):
        stage_dir = os.path.join(output_dir, f"round{round_}")
        sft = SFTTrainer(model=model, args=SFTConfig(output_dir=f"{stage_dir}-sft", **common),
                         train_dataset=sft_data, processing_class=tokenizer,
                         callbacks=[HybridEWCCallback(ewc, objective="ifa")])
        sft.train()
        # the DPO reference is the model as the SFT stage left it, loaded from disk (where ZeRO-3 partitions
        # the model, a copy in memory is not possible; its JSON needs stage3_gather_16bit_weights_on_model_save)
        sft.save_model(f"{stage_dir}-sft/final")
        sft.accelerator.wait_for_everyone()  # rank 0 wrote it; every rank reads it
        release_trainer(sft)  # its engine (DeepSpeed); the next trainer builds its own
        dpo_args = DPOConfig(output_dir=f"{stage_dir}-dpo", beta=0.1, **common)
        reference = LlamaForCausalLM.from_pretrained(f"{stage_dir}-sft/final")
        dpo = DPOTrainer(model=model, ref_model=reference, args=dpo_args, train_dataset=dpo_data,
                         processing_class=tokenizer, callbacks=[HybridEWCCallback(ewc, objective="hpa")])
        dpo.train()
        release_trainer(dpo)
        for name, trainer in (("sft", sft), ("dpo", dpo)):
            last = [e for e in trainer.state.log_history if "ewc/penalty" in e][-1]
            if rank == 0:
                print(f"round {round_} {name}: loss {last['loss']:.4f}  ewc/penalty {last['ewc/penalty']:.3e}  "
                      f"ewc/importance_entropy {last['ewc/importance_entropy']:.3f}")
    if rank == 0:
        print(f"checkpoints with the HybridEWC state under {output_dir}")
    return ewc


if __name__ == "__main__":
    main()
    if os.environ.get("WORLD_SIZE", "1") != "1":
        from hbat.trainer.engine import exit_process, shutdown_distributed

        shutdown_distributed()
        exit_process(0)  # DeepSpeed's gloo groups can abort a finished rank at interpreter exit
