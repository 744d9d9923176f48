"""Inference throughput: celldino ViT vs HF transformers ViTModel vs a DINO-style manual ViT.

All three get the same weights (checked: same class tokens) and the same batch; fp32 on the CPU
by default. Rounds alternate between the models so that background load hits all of them alike;
the median time per batch is reported. Also reports the fraction of the machine's measured fp32
matmul peak (model FLOPs per image × images/s ÷ peak).

    .venv/bin/python bench/bench_inference.py                      # ViT-S/16, 5 ch, 224 px, batch 64
    .venv/bin/python bench/bench_inference.py --batch 16 --rounds 3  # shorter
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time

import torch
from torch import nn

from celldino.models import vit_small

# ---- the peer in the style of the original DINO code (facebookresearch/dino) --------------


class DinoAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class DinoMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DinoBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = DinoAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = DinoMlp(dim, dim * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoPatchEmbed(nn.Module):
    def __init__(self, patch: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
    def __init__(self, img: int, patch: int, in_chans: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.patch = patch
        self.patch_embed = DinoPatchEmbed(patch, in_chans, dim)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList([DinoBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        npatch, N = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


# ---- HF transformers ViTModel with the same weights --------------------------------------


def hf_vit(sd: dict, img: int, patch: int, in_chans: int, dim: int, depth: int, heads: int):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=4 * dim,
        image_size=img,
        patch_size=patch,
        num_channels=in_chans,
        layer_norm_eps=1e-6,
    )
    model = ViTModel(cfg, add_pooling_layer=False)  # default attention (sdpa in transformers 5)
    hf = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    # transformers 5 names its blocks layers.N (q/k/v_proj, o_proj, mlp.fc1/2); 4.x encoder.layer.N
    v5 = any(k.startswith("layers.") for k in model.state_dict())
    qkv = (
        [f"attention.{n}_proj." for n in "qkv"]
        if v5
        else [f"attention.attention.{n}." for n in ("query", "key", "value")]
    )
    out, fc1, fc2 = (
        ("attention.o_proj.", "mlp.fc1.", "mlp.fc2.")
        if v5
        else ("attention.output.dense.", "intermediate.dense.", "output.dense.")
    )
    for i in range(depth):
        s, b = (f"layers.{i}." if v5 else f"encoder.layer.{i}."), f"blocks.{i}."
        for t in ("weight", "bias"):
            for j, name in enumerate(qkv):
                hf[s + name + t] = sd[b + "attn.qkv." + t].chunk(3)[j]
            hf[s + out + t] = sd[b + "attn.proj." + t]
            hf[s + "layernorm_before." + t] = sd[b + "norm1." + t]
            hf[s + "layernorm_after." + t] = sd[b + "norm2." + t]
            hf[s + fc1 + t] = sd[b + "mlp.fc1." + t]
            hf[s + fc2 + t] = sd[b + "mlp.fc2." + t]
    model.load_state_dict(hf, strict=True)
    return model


# ---- measurement --------------------------------------------------------------------------


def vit_flops(img: int, patch: int, in_chans: int, dim: int, depth: int) -> float:
    """Multiply-add FLOPs (×2) of one image through the ViT."""
    n = (img // patch) ** 2
    t = n + 1
    embed = 2 * n * dim * in_chans * patch * patch
    block = (
        2 * t * dim * 3 * dim + 2 * 2 * t * t * dim + 2 * t * dim * dim + 2 * 2 * t * dim * 4 * dim
    )
    return embed + depth * block


def matmul_peak(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """(FLOP/s by wall clock, FLOP/s per CPU-second) of the best of `reps` n×n fp32 matmuls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, best_cpu = math.inf, math.inf
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return 2 * n**3 / best, 2 * n**3 / best_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=5)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="timed batches per model (alternating)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim, depth, heads = 384, 12, 6
    ours = vit_small(img_size=args.size, patch_size=args.patch, in_chans=args.channels).eval()
    with torch.no_grad():  # random non-trivial norms and biases
        for p in ours.parameters():
            if p.ndim == 1:
                p.add_(0.02 * torch.randn_like(p))
    sd = {k: v for k, v in ours.state_dict().items()}
    dino = DinoViT(args.size, args.patch, args.channels, dim, depth, heads).eval()
    dino.load_state_dict({k: v for k, v in sd.items() if k != "mask_token"}, strict=True)
    hf = hf_vit(sd, args.size, args.patch, args.channels, dim, depth, heads).eval()

    x = torch.randn(args.batch, args.channels, args.size, args.size)
    runners = {
        "celldino": lambda: ours(x)["cls"],
        "HF ViTModel": lambda: hf(pixel_values=x).last_hidden_state[:, 0],
        "DINO-style manual": lambda: dino(x),
    }
    times: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    with torch.inference_mode():
        outs = {k: f() for k, f in runners.items()}  # warm-up + agreement check
        diff = max((outs[k] - outs["celldino"]).abs().max().item() for k in outs)
        for _ in range(args.rounds):
            for k, f in runners.items():
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    peak, peak_cpu = matmul_peak()
    flops = vit_flops(args.size, args.patch, args.channels, dim, depth)
    print(
        f"ViT-S/{args.patch}, {args.channels} channels, {args.size} px, batch {args.batch}, fp32, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    print(f"HF attention implementation: {hf.config._attn_implementation}")
    print(f"max |cls difference| between the three models: {diff:.2e}")
    print(
        f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s wall, {peak_cpu / 1e9:.1f} GFLOP "
        f"per CPU-s; model: {flops / 1e9:.2f} GFLOP/image"
    )
    ref = args.batch / statistics.median(times["celldino"])
    ref_cpu = args.batch / statistics.median(cpu["celldino"])
    print(
        f"\n{'model':<20}{'images/s':>10}{'celldino ×faster':>18}{'% of peak':>11}"
        f"{'images/CPU-s':>14}{'celldino ×faster':>18}{'% of peak':>11}"
    )
    for k, ts in times.items():
        ips = args.batch / statistics.median(ts)
        ips_cpu = args.batch / statistics.median(cpu[k])
        print(
            f"{k:<20}{ips:>10.1f}{ref / ips:>18.2f}{100 * ips * flops / peak:>10.1f}%"
            f"{ips_cpu:>14.2f}{ref_cpu / ips_cpu:>18.2f}{100 * ips_cpu * flops / peak_cpu:>10.1f}%"
        )
    print("(images/CPU-s: per second of CPU time used by this process, robust to other load)")


if __name__ == "__main__":
    main()
