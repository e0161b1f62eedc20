"""Do the model's two fast paths pay? The trainer's step at lm_basics_bench's shapes (4 layers x 256, context 256,
batch 16, vocab 10k, 2 threads) with RMSNorm's written-out backward and the complex-number RoPE (`fast`), or with
the plain forms (`F.rms_norm`, the rotate-pairs formula) for one of them or both. One variant per process, so each
peak RSS is its own; run them interleaved, several rounds, and compare within one run:

    for r in 1 2; do for v in fast plain_norm plain_rope plain; do python tools/fastpath_ab.py $v; done; done
"""
import sys, time, resource, torch, torch.nn.functional as F
torch.set_num_threads(2)
from lm_basics import model as M
from lm_basics.optim import make_optimizer
from lm_basics.train import TrainStep
from lm_basics.bench import FixedBatch
v = sys.argv[1]
def rope(self, x, positions=None):
    T = x.shape[-2]
    cos, sin = (self.cos[:T], self.sin[:T]) if positions is None else (self.cos[positions], self.sin[positions])
    dtype, x = x.dtype, x.float()
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(dtype)
if v in ('plain', 'plain_norm'):
    M.RMSNorm.forward = lambda self, x: F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
    if v != 'plain_norm': M.RotaryEmbedding.forward = rope
if v == 'plain_rope':
    M.RotaryEmbedding.forward = rope
dtype = sys.argv[2] if len(sys.argv) > 2 else 'float32'
torch.manual_seed(0)
m = M.TransformerLM(10000, 256, 256, 4, 4, 688)
g = torch.Generator().manual_seed(1)
x, y = (torch.randint(10000, (16, 256), generator=g) for _ in range(2))
step = TrainStep(m, make_optimizer(m, device_type='cpu'), dtype=dtype, loss_chunk=1024, compile=False)
b = FixedBatch(x, y)
for _ in range(2): step(b, check=True)
ts = []
for _ in range(5):
    t = time.perf_counter(); step(b, check=True).loss.item(); ts.append(time.perf_counter() - t)
ts.sort()
print(f"{v} {dtype} {ts[len(ts)//2]*1000:.0f} ms/step  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB")
