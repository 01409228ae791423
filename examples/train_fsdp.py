"""FSDP2 training with fused_wd: a small GPT-style transformer, sharded with
`torch.distributed.fsdp.fully_shard`, trained by `fused_wd.AdamW(...,
max_grad_norm=...)` (norm over every rank's shards, clip, decay and update in
one fused pass per rank, one all-reduce for the norm), checkpointed with
torch.distributed.checkpoint (DCP).

    torchrun --nproc-per-node 2 examples/train_fsdp.py                 # a few seconds on CPU
    torchrun --nproc-per-node 2 examples/train_fsdp.py --resume        # continue from --ckpt
    torchrun --nproc-per-node 2 examples/train_fsdp.py --steps 200 --dim 256 --layers 4

GPUs and nccl are used when every rank has a GPU, else the CPU and gloo
(`--backend` forces either). The data are random tokens with a learnable rule
(each sequence counts up from a random start by a random stride, mod the
vocabulary), so the loss falls from log(vocab) as the model learns it. Logs
show the loss (mean over ranks) and `opt.last_grad_norm`, the pre-clip global
gradient norm of the whole model; reading them is the only host sync of a step.
"""
import argparse
import math
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

try:
    import fused_wd
except ImportError:          # run from a source checkout without installing: the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_wd


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, dim, heads, layers, seq):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def batch(args, step, rank, device):
    """This rank's share of step `step`'s global batch (reproducible on resume)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    start = torch.randint(args.vocab, (args.batch, 1), generator=g)
    stride = torch.randint(1, 8, (args.batch, 1), generator=g)
    seq = (start + stride * torch.arange(args.seq + 1)) % args.vocab
    seq = seq.to(device)
    return seq[:, :-1], seq[:, 1:]


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--ckpt", default="/tmp/fused_wd_fsdp_ckpt",
                    help="DCP checkpoint directory (written at the end of the run)")
    ap.add_argument("--resume", action="store_true", help="load --ckpt first, if it exists")
    ap.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main():
    args = parse()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local_world else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(args.seed)  # the same init on every rank, then sharded
    model = GPT(args.vocab, args.dim, args.heads, args.layers, args.seq).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = fused_wd.AdamW(fused_wd.param_groups_for_decay(model, args.weight_decay), lr=args.lr,
                         betas=(0.9, 0.95), max_grad_norm=args.max_grad_norm)

    start_step = 0
    if args.resume and os.path.exists(os.path.join(args.ckpt, ".metadata")):
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                 "step": torch.zeros((), dtype=torch.int64)}
        dcp.load(state, checkpoint_id=args.ckpt)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        start_step = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {start_step}", flush=True)

    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"{world} ranks, {backend} on {device.type}, {n_params / 1e6:.2f}M params, "
              f"fused_wd {fused_wd.__version__} (backends: {fused_wd.backends()})", flush=True)
    t0 = time.perf_counter()
    for step in range(start_step, args.steps):
        x, y = batch(args, step, rank, device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()            # global norm (1 all-reduce), clip, decay, AdamW: one fused pass
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # SUM (gloo has no AVG)
            if rank == 0:
                print(f"step {step + 1:4d}  loss {mean_loss.item() / world:.4f}  "
                      f"grad_norm {opt.last_grad_norm.item():.4f}  "
                      f"(ln vocab {math.log(args.vocab):.2f})  {time.perf_counter() - t0:.1f}s",
                      flush=True)

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
             "step": torch.tensor(args.steps, dtype=torch.int64)}
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(args.ckpt, overwrite=True))
    if rank == 0:
        print(f"saved a DCP checkpoint of step {args.steps} to {args.ckpt}", flush=True)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
