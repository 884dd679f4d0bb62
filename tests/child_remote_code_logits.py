"""Run by tests/test_conversion.py in a fresh process: load MODEL_DIR through its remote code (`trust_remote_code`,
not this package's classes) and print the sum of the logits of one fixed input."""

import sys

import torch
from transformers import AutoModelForCausalLM

if __name__ == "__main__":
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    with torch.no_grad():
        print(model(torch.tensor([[1, 2, 3]])).logits.sum().item())
