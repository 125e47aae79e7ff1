"""Run under torchrun by test_distributed.py: train the tiny model with this process's share."""

import sys

import torch

from fastft import TrainConfig, Trainer
from tests.train.helpers import tiny_setup

if __name__ == "__main__":
    data, out, method, fsdp, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", \
        int(sys.argv[5])
    torch.set_num_threads(1)
    model, tok = tiny_setup()
    cfg = TrainConfig(batch_size=batch, max_steps=4, lr=3e-3, warmup_ratio=0.0,
                      schedule="constant", progress=False, lora_r=4, method=method, fsdp=fsdp,
                      output_dir=out)
    Trainer(model, tok, data, cfg).train()
