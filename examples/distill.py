"""Self-distillation of AHN memories on a tiny random Qwen2 (CPU, about a minute).

The recipe of the paper: the base model's weights stay frozen; its full-attention
logits teach the same model with sliding-window + sinks attention and an AHN
memory; only the memory's parameters train (KL on positions >= W). For a real
model, replace ``tiny_model()`` with ``AutoModelForCausalLM.from_pretrained(...)``
and the random tokens with your long-context data.

    python examples/distill.py [--memory gdn] [--steps 30]
"""

import argparse

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

import ahn_kernels as ak
from ahn_kernels.layers import ahn_parameters, distill_loss


def tiny_model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return Qwen2ForCausalLM(config)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", choices=("gdn", "dn", "mamba2"), default="gdn")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--length", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--save", metavar="FILE.safetensors", help="write the AHN weights (released key layout)")
    args = parser.parse_args(argv)

    model = ak.patch_model(tiny_model(), memory=args.memory, window_size=args.window, num_sinks=args.sinks)
    model.train()
    params = [p for _, p in ahn_parameters(model)]
    print(f"AHN-{args.memory.upper()}: {sum(p.numel() for p in params)} trainable parameters, "
          f"{sum(p.numel() for p in model.parameters() if not p.requires_grad)} frozen")
    opt = torch.optim.AdamW(params, lr=3e-3)
    # A fixed batch of random tokens: enough to watch the KL fall on a random model.
    ids = torch.randint(0, model.config.vocab_size, (2, args.length), generator=torch.Generator().manual_seed(1))
    for step in range(args.steps):
        loss = distill_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step:3d}  KL {loss.item():.3e}")
    if args.save:
        # ahn_parameters' names are the released checkpoints' keys: load_ahn_weights reads the file back.
        save_file({n: p.detach().contiguous() for n, p in ahn_parameters(model)}, args.save)
        print(f"AHN weights written to {args.save}")


if __name__ == "__main__":
    main()
