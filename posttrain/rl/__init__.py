"""The training loops, and what they share.

The algorithms, one file each, reading top to bottom as the algorithm:
    sft.py, reward.py, prm.py, dpo.py, kto.py, cpo.py, orpo.py    offline: a dataset, a loss, `loop.fit`
    grpo.py, rloo.py, online_dpo.py, ppo.py                       online: rollouts, rewards, a policy loss

What they share:
    logprobs.py      (model, batch) -> per-token log-probs: the one place logits are made
    rollout.py       generation (prefill, one-token decode, sampling) for the online loops and `posttrain eval`;
                     decode.py, its one-token step for the Llama family on the CPU
    rewards.py       reward functions and reward models with TRL's calling convention
    loop.py          optimizer, schedule, accumulation, clipping, evaluation, the step loop (`fit`)
    config.py        the options every loop takes; checkpoint.py, faults.py, logger.py
    models.py        loading models and tokenizers; lora.py (adapters, QLoRA); distributed.py (DDP, FSDP2)

The layout stays flat on purpose (decided once, with eleven loops written): the shared files are twelve,
with names that do not clash with a loop's, every loop imports most of them, and the paths users cite
(`rl/logprobs.py`, `rl/loop.py`, `rl/rollout.py`) stay where the issues, the README and published notes
put them. This map, rather than a subfolder, keeps the list of algorithms readable.
"""
