"""PyTorch reference of Keel's model and step on one GPU, for bench/gpu/run.sh (eager or torch.compile).

The same layers as core/model/llama.cpp: RMSNorm, rotate-half RoPE with fp32 angles, GQA attention through
flash SDPA, SwiGLU, untied head, separate q/k/v and gate/up projections like Keel's; bf16 autocast over fp32
weights. Not the same numerics: under autocast the residual stream stays fp32 (each block's bf16 output is added
to an fp32 sum), where Keel's is bf16, so this reference moves more bytes per residual add and norm. Fused
AdamW (0.9/0.95, wd 0.1), global-norm clip 1.0; random tokens. Prints one line of key=value: median step time,
tokens/s and peak memory (torch.cuda.max_memory_allocated) after the warm-up steps.
"""
import argparse, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
for name in ("layers", "d_model", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len", "micro_batch"):
    p.add_argument("--" + name, type=int, required=True)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=10)
p.add_argument("--compile", action="store_true")
a = p.parse_args()
B, T, C, H, K = a.micro_batch, a.seq_len, a.d_model, a.heads, a.kv_heads
D = C // H
dev = "cuda"


class RMSNorm(nn.Module):
    def __init__(s, d):
        super().__init__(); s.weight = nn.Parameter(torch.ones(d))
    def forward(s, x):
        return F.rms_norm(x.float(), (x.shape[-1],), s.weight, 1e-5).to(x.dtype)


def rope(x, cos, sin):  # x [B, T, h, D]; fp32 angles
    xf = x.float(); x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.attn_norm, s.mlp_norm = RMSNorm(C), RMSNorm(C)
        s.wq, s.wk, s.wv = (nn.Linear(C, n * D, bias=False) for n in (H, K, K))
        s.wo = nn.Linear(H * D, C, bias=False)
        s.w_gate, s.w_up = nn.Linear(C, a.ffn_hidden, bias=False), nn.Linear(C, a.ffn_hidden, bias=False)
        s.w_down = nn.Linear(a.ffn_hidden, C, bias=False)
    def forward(s, x, cos, sin):
        h = s.attn_norm(x)
        q = rope(s.wq(h).view(B, T, H, D), cos, sin).transpose(1, 2)
        k = rope(s.wk(h).view(B, T, K, D), cos, sin).transpose(1, 2)
        v = s.wv(h).view(B, T, K, D).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=(K != H))
        x = x + s.wo(y.transpose(1, 2).reshape(B, T, H * D))
        m = s.mlp_norm(x)
        return x + s.w_down(F.silu(s.w_gate(m)) * s.w_up(m))


class Model(nn.Module):
    def __init__(s):
        super().__init__()
        s.embed = nn.Embedding(a.vocab, C)
        s.blocks = nn.ModuleList(Block() for _ in range(a.layers))
        s.final_norm, s.head = RMSNorm(C), nn.Linear(C, a.vocab, bias=False)
        inv = 10000.0 ** (-torch.arange(0, D // 2, dtype=torch.float32) * 2.0 / D)
        ang = torch.outer(torch.arange(T, dtype=torch.float32), inv)  # [T, D/2]
        s.register_buffer("cos", ang.cos().view(1, T, 1, D // 2)); s.register_buffer("sin", ang.sin().view(1, T, 1, D // 2))
    def forward(s, idx, tgt):
        x = s.embed(idx)
        for b in s.blocks: x = b(x, s.cos, s.sin)
        return F.cross_entropy(s.head(s.final_norm(x)).float().view(-1, a.vocab), tgt.view(-1))


torch.backends.cuda.matmul.allow_tf32 = True
model = Model().to(dev)
decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=3e-4, betas=(0.9, 0.95), fused=True)
forward = torch.compile(model) if a.compile else model
times = []
for i in range(a.steps):
    x = torch.randint(0, a.vocab, (B, T + 1), device=dev)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = forward(x[:, :-1], x[:, 1:])
    loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
timed = sorted(times[a.warmup:])
median = timed[len(timed) // 2]
print(f"step_ms={median * 1e3:.2f} tokens_per_s={B * T / median:.0f} peak_gib={torch.cuda.max_memory_allocated() / 2**30:.2f} "
      f"params={sum(p.numel() for p in model.parameters())} compile={int(a.compile)}")
