# One-off A/B script (run from the repository root with OUT set); kept in history only.
import time, torch, statistics, json, os
import gemma4_fast
from gemma4_fast.models import build_model, offline_tokenizer
from transformer_lens.model_bridge import TransformerBridge
model = build_model("E2B", torch.bfloat16, "cuda", attn_implementation="eager", experts_implementation="grouped_mm")
bridge = TransformerBridge.boot_transformers("google/gemma-4-E2B", hf_model=model, tokenizer=offline_tokenizer())
gemma4_fast.enable_fast_kernels(bridge, True)
gemma4_fast.enable_prefill_graphs(bridge)
res = {}
for S in (4096, 8192):
    ids = torch.randint(4, 260000, (1, S), device="cuda"); ids[0, 0] = 2
    with torch.no_grad():
        for _ in range(3): bridge(ids)
        torch.cuda.synchronize()
        synced = []
        for _ in range(8):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); out = bridge(ids); b.record(); torch.cuda.synchronize(); del out
            synced.append(a.elapsed_time(b))
        # back to back: host of call i+1 overlaps GPU of call i
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        outs = []
        a.record()
        for _ in range(8):
            outs.append(bridge(ids))
            if len(outs) > 1: outs.pop(0)
        b.record(); torch.cuda.synchronize()
        chained = a.elapsed_time(b) / 8
        # host time to return from the call (GPU still busy)
        torch.cuda.synchronize()
        t = time.perf_counter(); out = bridge(ids); host_ret = (time.perf_counter() - t) * 1e3; torch.cuda.synchronize(); del out
    res[S] = {"synced_median_ms": statistics.median(synced), "synced": [round(x, 2) for x in synced], "chained_per_call_ms": chained, "host_return_ms": host_ret}
    print(S, res[S], flush=True)
json.dump(res, open(os.environ["OUT"] + "/exposed_host.json", "w"), indent=1)
