"""Run under torchrun by test_distributed.py: train the tiny model with this process's share.

Each process saves every weight of its model to ``<out>/rank<r>.safetensors`` (the
ranks must end identical) besides the trainer's own run folder.
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import fastft
from fastft import TrainConfig, Trainer
from tests.train.helpers import tiny_setup

# small settings for the sparse methods on a hidden-32 model (their defaults need wider layers)
METHODS = {"lift": lambda: fastft.LIFT(lora_rank=2, filter_rank=4),
           "hft": lambda: fastft.HFT(seed=1),
           "ltsft": lambda: fastft.LTSFT(proportion=0.05),
           "green": lambda: fastft.GreenTrainer(rho=0.5, interval=1)}  # re-selects at epoch 1

if __name__ == "__main__":
    data, out, method, fsdp, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", \
        int(sys.argv[5])
    torch.set_num_threads(1)
    model, tok = tiny_setup()
    if method in METHODS:
        fastft.prepare(model, METHODS[method]())
    # "uds": LoRA under UDS selection; its micro-batch groups are the same on 1 process
    # with 2 micro-batches as on 2 processes with one each
    extra = {}
    if method == "uds":
        method, extra = "lora", dict(select="uds", select_ratio=0.5,
                                     grad_accum=4 // (batch * int(os.environ["WORLD_SIZE"])))
    cfg = TrainConfig(batch_size=batch, max_steps=4, lr=1e-3, warmup_ratio=0.0,
                      schedule="constant", progress=False, lora_r=4, method=method, fsdp=fsdp,
                      output_dir=out, **extra)
    trainer = Trainer(model, tok, data, cfg)
    trainer.train()
    if not fsdp:
        rank = trainer.dist.rank
        state = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        save_file(state, str(Path(out) / f"rank{rank}.safetensors"))
