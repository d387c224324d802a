# One-off A/B script (run from the repository root with OUT set); kept in history only.
"""A/B of the whole-model gate: the per-block gate (getattr-based stop/start lookups, per-block unchanged()) against
all_quiet_gate, alternated in one process on one bridge; bridge forward timed with CUDA events (synced calls)."""
import os, json, statistics, time, torch
import gemma4_fast
from gemma4_fast.models import build_model, offline_tokenizer
from gemma4_fast.bridge_integration import quiet as Q
from transformer_lens.model_bridge import TransformerBridge

def old_plan_for(block):
    plan = block.__dict__.get(Q._STATE)
    if plan is None or Q.global_module_hooks(backward=True):
        return None
    for attr in ("_stop_at_layer_idx", "_start_at_layer_idx"):
        at = getattr(block, attr, None)
        if at is not None and (plan.index is None or at == plan.index):
            return None
    if plan.unchanged() and not any(getattr(m, "_use_processed_weights", False) for m in plan.processed):
        return plan
    return Q._plan_for(block)

model = build_model("E2B", torch.bfloat16, "cuda", attn_implementation="eager", experts_implementation="grouped_mm")
bridge = TransformerBridge.boot_transformers("google/gemma-4-E2B", hf_model=model, tokenizer=offline_tokenizer())
gemma4_fast.enable_fast_kernels(bridge, True)
g = gemma4_fast.enable_prefill_graphs(bridge)
blocks = list(bridge.blocks)
gates = {"per_block": lambda: all(old_plan_for(b) is not None for b in blocks), "flat": g.model_gate}
res = {}
for S in (4096, 8192):
    ids = torch.randint(4, 260000, (1, S), device="cuda"); ids[0, 0] = 2
    times = {k: [] for k in gates}
    host = {k: [] for k in gates}
    with torch.no_grad():
        for _ in range(3): bridge(ids)
        for r in range(4):
            for name, gate in gates.items():
                g.model_gate = gate
                bridge(ids); torch.cuda.synchronize()
                for _ in range(6):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t = time.perf_counter(); a.record(); out = bridge(ids); h = time.perf_counter() - t; b.record()
                    torch.cuda.synchronize(); del out
                    times[name].append(a.elapsed_time(b)); host[name].append(h * 1e3)
    res[S] = {k: {"median_ms": round(statistics.median(v), 3), "host_return_ms": round(statistics.median(host[k]), 3), "all": [round(x, 2) for x in v]} for k, v in times.items()}
    print(S, {k: (v["median_ms"], v["host_return_ms"]) for k, v in res[S].items()}, "replays", g.model_replays, flush=True)
g.model_gate = gates["flat"]
json.dump(res, open(os.environ["OUT"] + "/gate_ab.json", "w"), indent=1)
