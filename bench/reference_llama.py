"""PyTorch reference of Keel's decoder and training step, for bench/step_cpu.sh.

Same architecture as core/model/llama.cpp (RMSNorm, RoPE rotate-half in fp32, GQA, SwiGLU, untied head), same
optimizer (AdamW 0.9/0.95, wd 0.1 on matrices), same global-norm clip, same micro-batching, bf16 autocast when
--precision bf16-mixed. Prints the median tokens/s over the timed steps as `reference_tokens_per_s=<x>`.
Run with Debian's own interpreter (/usr/bin/python3), which has python3-torch 1.13 (CPU).
"""
import argparse, math, statistics, time
import torch, torch.nn as nn, torch.nn.functional as F

p = argparse.ArgumentParser()
for name, default in [("layers", 4), ("d_model", 128), ("heads", 4), ("kv_heads", 2), ("ffn_hidden", 352),
                      ("vocab", 2048), ("seq_len", 128), ("micro_batch", 8), ("grad_accum", 2), ("steps", 30),
                      ("warmup", 5), ("threads", 0)]:
    p.add_argument("--" + name, type=int, default=default)
p.add_argument("--precision", default="bf16-mixed")
a = p.parse_args()
if a.threads > 0:
    torch.set_num_threads(a.threads)
D = a.d_model // a.heads


class RMSNorm(nn.Module):
    def __init__(s, d):
        super().__init__(); s.weight = nn.Parameter(torch.ones(d))
    def forward(s, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * s.weight).to(x.dtype)


def rope(x, cos, sin):  # x [B, T, h, D], rotate-half, fp32
    xf = x.float(); x1, x2 = xf[..., : D // 2], xf[..., D // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.attn_norm, s.mlp_norm = RMSNorm(a.d_model), RMSNorm(a.d_model)
        s.wq = nn.Linear(a.d_model, a.heads * D, bias=False)
        s.wk = nn.Linear(a.d_model, a.kv_heads * D, bias=False)
        s.wv = nn.Linear(a.d_model, a.kv_heads * D, bias=False)
        s.wo = nn.Linear(a.heads * D, a.d_model, bias=False)
        s.w_gate = nn.Linear(a.d_model, a.ffn_hidden, bias=False)
        s.w_up = nn.Linear(a.d_model, a.ffn_hidden, bias=False)
        s.w_down = nn.Linear(a.ffn_hidden, a.d_model, bias=False)
    def forward(s, x, cos, sin, mask):
        B, T, _ = x.shape
        h = s.attn_norm(x)
        q = rope(s.wq(h).view(B, T, a.heads, D), cos, sin).transpose(1, 2)
        k = rope(s.wk(h).view(B, T, a.kv_heads, D), cos, sin).transpose(1, 2)
        v = s.wv(h).view(B, T, a.kv_heads, D).transpose(1, 2)
        g = a.heads // a.kv_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        probs = scores.float().masked_fill(mask, float("-inf")).softmax(-1).to(q.dtype)
        y = (probs @ v).transpose(1, 2).reshape(B, T, a.heads * D)
        x = x + s.wo(y)
        m = s.mlp_norm(x)
        return x + s.w_down(F.silu(s.w_gate(m)) * s.w_up(m))


class Model(nn.Module):
    def __init__(s):
        super().__init__()
        s.embed = nn.Embedding(a.vocab, a.d_model)
        s.blocks = nn.ModuleList(Block() for _ in range(a.layers))
        s.final_norm, s.head = RMSNorm(a.d_model), nn.Linear(a.d_model, a.vocab, bias=False)
        inv = 1.0 / (10000.0 ** (torch.arange(0, D // 2, dtype=torch.float32) * 2.0 / D))
        ang = torch.outer(torch.arange(a.seq_len, dtype=torch.float32), inv)
        s.cos, s.sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        s.mask = torch.ones(a.seq_len, a.seq_len, dtype=torch.bool).triu(1)
    def forward(s, window):
        x = s.embed(window[:, :-1])
        for b in s.blocks:
            x = b(x, s.cos, s.sin, s.mask)
        logits = s.head(s.final_norm(x)).float()
        return F.cross_entropy(logits.view(-1, a.vocab), window[:, 1:].reshape(-1))


torch.manual_seed(0)
m = Model()
decay = [q for q in m.parameters() if q.dim() >= 2]
no_decay = [q for q in m.parameters() if q.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
times = []
for step in range(a.steps):
    batch = torch.randint(0, a.vocab, (a.micro_batch * a.grad_accum, a.seq_len + 1))
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    for i in range(a.grad_accum):
        mb = batch[i * a.micro_batch:(i + 1) * a.micro_batch]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16-mixed"):
            loss = m(mb)
        (loss / a.grad_accum).backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    loss.item()
    times.append(time.perf_counter() - t0)
tokens = a.micro_batch * a.grad_accum * a.seq_len
timed = times[a.warmup:] if len(times) > a.warmup else times
print(f"reference_tokens_per_s={tokens / statistics.median(timed):.1f}")
