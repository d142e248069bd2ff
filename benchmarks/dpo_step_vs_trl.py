"""Offline DPO training steps: this project's Megatron policy against TRL's DPOTrainer, one process.

    pip install trl==1.16.0   # the peer; not a dependency of the project
    OMP_NUM_THREADS=1 python benchmarks/dpo_step_vs_trl.py [--steps 40] [--batch 16] [--threads 1]

Same model (the tiny_cpu Llama: hidden 128, 4 layers, GQA 4/2, 0.75M parameters, random weights),
same toy-task offline pairs, same batch size, beta 0.1, fp32. Ours: megatron-core GPTModel through
the forward-backward schedule, reference log-probs computed once up front, no attention mask, LM
head on response tokens only. TRL: DPOTrainer with a separate reference model, its defaults.
Prints seconds per optimiser step (median over the timed steps, after 5 warm-up steps) and pairs/s.
"""
import argparse
import copy
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from metaapo_nemo.data import toy_task

    tokenizer = toy_task.build_tokenizer()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))
    pairs = toy_task.offline_pairs(toy_task.make_prompts(args.batch * (args.steps + 5), seed=1), seed=2)
    ours = _ours(hf, tokenizer, pairs, args)
    trl = _trl(hf, tokenizer, pairs, args)
    print(f"\nDPO step, batch {args.batch}, {args.threads} thread(s), {args.steps} timed steps")
    print(f"{'implementation':<28} {'s/step (median)':>16} {'pairs/s':>9}")
    for name, seconds in (("metaapo-nemo (megatron-core)", ours), ("TRL 1.16 DPOTrainer", trl)):
        print(f"{name:<28} {seconds:>16.4f} {args.batch / seconds:>9.1f}")
    print(f"speed-up: {trl / ours:.2f}x")


def _ours(hf, tokenizer, pairs, args) -> float:
    from metaapo_nemo.algorithm.objectives import Objective, PairLogps
    from metaapo_nemo.data.batching import collate, encode_prompt, encode_response
    from metaapo_nemo.distributed import init_distributed
    from metaapo_nemo.models.hf_convert import model_config_from_hf
    from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

    init_distributed()
    cfg = model_config_from_hf(hf.config)
    policy = MegatronPolicy(cfg, hf.state_dict(), pad_id=0, optim=OptimConfig(lr=5e-5, clip_grad=1.0))
    reference = MegatronPolicy(cfg, hf.state_dict(), pad_id=0)
    prompts = [encode_prompt(tokenizer, p["prompt"]) for p in pairs]
    chosen = [(q, encode_response(tokenizer, p["chosen"])) for q, p in zip(prompts, pairs)]
    rejected = [(q, encode_response(tokenizer, p["rejected"])) for q, p in zip(prompts, pairs)]
    ref_c, ref_r = reference.score(chosen)[0], reference.score(rejected)[0]
    objective = Objective("dpo", beta=0.1)

    def make_batch(idx):
        return collate([chosen[i] for i in idx] + [rejected[i] for i in idx], 0)

    def loss_fn(idx, logp, ntok):
        n = len(idx)
        loss = objective.loss(PairLogps(logp[:n], logp[n:], ref_c[idx], ref_r[idx]))
        return loss.sum(), {}

    times = []
    for step in range(args.steps + 5):
        idx = list(range(step * args.batch, (step + 1) * args.batch))
        started = time.perf_counter()
        policy.train_step(idx, make_batch, loss_fn, micro_batch_size=args.batch)
        times.append(time.perf_counter() - started)
    return statistics.median(times[5:])


def _trl(hf, tokenizer, pairs, args) -> float:
    import tempfile

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, *a, **k):
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._start)

    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, use_cpu=True, per_device_train_batch_size=args.batch, max_steps=args.steps + 5,
                           learning_rate=5e-5, beta=0.1, report_to=[], logging_steps=10_000, save_strategy="no",
                           dataloader_num_workers=0, seed=0)
        trainer = DPOTrainer(model=copy.deepcopy(hf), ref_model=copy.deepcopy(hf), args=config,
                             train_dataset=Dataset.from_list(pairs), processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    return statistics.median(timer.times[5:])


if __name__ == "__main__":
    main()
