"""The GPU benchmark's table (tests/gpu/run.sh writes it to $OUT/summary.md).

    python3 tests/gpu/summarize.py GPU_LOG [TORCH_JSON]

Reads the parts of run.sh's log (bench_gate, bench_memory, the wgpu tests) and
tests/gpu/torch_bench.py's JSON, and prints one Markdown table of ours against PyTorch per dtype,
then the launch counts, memory and test results. A figure a part did not produce shows as "-".
"""
import json
import re
import sys


def sections(text):
    """{part name: its output}, from run.sh's '== name (limit ...' headers."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^== ([\w-]+) \(limit", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def num(pattern, text, group=1):
    m = re.search(pattern, text or "", re.M)
    return float(m.group(group)) if m else None


def bench_gate(text):
    """Per-phase step times (ms), loop totals (s), launches from bench_gate's output."""
    r = {
        "ungated_ms": num(r"^\s*ungated\s*:\s*\d+ steps,\s*([\d.]+) ms/step", text),
        "planning_ms": num(r"^\s*gated semantics-planning\s*:\s*\d+ steps,\s*([\d.]+) ms/step", text),
        "gated_ms": num(r"^\s*gated fidelity-improving\s*:\s*\d+ steps,\s*([\d.]+) ms/step", text),
        "gated_loop_s": num(r"whole loop\s*: gated ([\d.]+) s vs ungated ([\d.]+) s", text, 1),
        "ungated_loop_s": num(r"whole loop\s*: gated ([\d.]+) s vs ungated ([\d.]+) s", text, 2),
        "launches_planning": num(r"planning forward \(batch 2\)\s*:\s*(\d+) launches", text),
        "launches_gated": num(r"gated forward \(batch 1\)\s*:\s*(\d+) launches", text),
        "distinct": num(r"(\d+) distinct kernels compiled", text),
        "memory_mib": num(r"device memory[^:\n]*: ([\d.]+) MiB reserved", text),
    }
    m = re.search(r"^adapter: (.*)$", text or "", re.M)
    r["adapter"] = m.group(1) if m else None
    return r


def fmt(v, unit="", digits=1):
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def ratio(a, b, digits=2):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.{digits}f}"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    log = open(sys.argv[1]).read()
    parts = sections(log)
    torch = {}
    if len(sys.argv) > 2:
        try:
            torch = json.load(open(sys.argv[2]))
        except (OSError, ValueError) as e:
            print(f"(no PyTorch results: {e})\n")
    ours = {"f16": bench_gate(parts.get("ours-f16")), "f32": bench_gate(parts.get("ours-f32"))}
    adapter = ours["f16"]["adapter"] or ours["f32"]["adapter"]
    print(f"Ours: wgpu on {adapter or '?'}. PyTorch {torch.get('torch', '?')} on {torch.get('gpu', torch.get('device', '?'))}; "
          f"{torch.get('model', '?')} UNet, {torch.get('size', '?')}², PNDM {torch.get('steps', '?')} steps, "
          f"gate at {torch.get('gate_step', '?')} (original T-GATE).\n")
    print("| | ours f16 | PyTorch f16 | ours ÷ PyTorch | ours f32 | PyTorch f32 | ours ÷ PyTorch |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for dtype in ("f16", "f32"):
        o = ours[dtype]
        t = torch.get("results", {}).get(dtype, {})
        u, g = t.get("ungated", {}), t.get("gated", {})
        ms = lambda s: None if s is None else s * 1e3
        rows.append([
            ("ungated step, batch 2 (ms)", o["ungated_ms"], ms(u.get("step_s"))),
            ("gated loop: planning step (ms)", o["planning_ms"], ms(g.get("planning_step_s"))),
            ("gated loop: gated step, batch 1 (ms)", o["gated_ms"], ms(g.get("gated_step_s"))),
            ("UNet forward alone, batch 2 / 1 (ms)", None, (ms(t.get("unet_batch2_s")), ms(t.get("unet_batch1_s")))),
            ("ungated loop (s)", o["ungated_loop_s"], u.get("loop_s")),
            ("gated loop (s)", o["gated_loop_s"], g.get("loop_s")),
        ])
    for i, (label, _, _) in enumerate(rows[0]):
        cells = []
        for dtype_rows in rows:
            _, a, b = dtype_rows[i]
            if isinstance(b, tuple):
                cells += ["-", f"{fmt(b[0])} / {fmt(b[1])}", "-"]
            else:
                cells += [fmt(a, digits=2 if "(s)" in label else 1), fmt(b, digits=2 if "(s)" in label else 1),
                          ratio(a, b)]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for dtype in ("f16", "f32"):
        o = ours[dtype]
        t = torch.get("results", {}).get(dtype, {})
        u, g = t.get("ungated", {}), t.get("gated", {})
        d = t.get("gated_tgate_defaults", {})
        print(f"\n{dtype}: gated ÷ planning step: ours {ratio(o['gated_ms'], o['planning_ms'])}, PyTorch "
              f"{ratio(g.get('gated_step_s'), g.get('planning_step_s'))}; whole loop ungated ÷ gated: ours "
              f"{ratio(o['ungated_loop_s'], o['gated_loop_s'])}, PyTorch {ratio(u.get('loop_s'), g.get('loop_s'))} "
              f"(tgate's defaults {ratio(u.get('loop_s'), d.get('loop_s'))}); PyTorch whole image (text encoder, "
              f"loop, VAE) ungated {fmt(t.get('image_ungated_s'), ' s', 2)}, gated {fmt(t.get('image_gated_s'), ' s', 2)}"
              f" ({ratio(t.get('image_ungated_s'), t.get('image_gated_s'))}x)")
    o = ours["f16"]
    print(f"\nOurs f16: {fmt(o['launches_planning'], digits=0)} launches per planning forward, "
          f"{fmt(o['launches_gated'], digits=0)} per gated forward, {fmt(o['distinct'], digits=0)} distinct kernels "
          f"compiled cold; UNet memory {fmt(o['memory_mib'], ' MiB')} reserved.")
    ahead = re.search(r"one step ahead vs waiting after each step[^\n]*", parts.get("ours-f16", ""))
    if ahead:
        print(f"One step ahead (f16):{ahead.group(0).split('):', 1)[-1]}")
    tgd = bench_gate(parts.get("tgate-defaults"))
    if tgd["gated_loop_s"]:
        print(f"Ours f16 with tgate's defaults (sp 5, warm-up 2): gated loop {fmt(tgd['gated_loop_s'], ' s', 2)}, "
              f"ungated {fmt(tgd['ungated_loop_s'], ' s', 2)} ({ratio(tgd['ungated_loop_s'], tgd['gated_loop_s'])}x)")
    mem = parts.get("memory", "")
    # The last generation's figures (bench_memory runs the request --generations times).
    gen = ([None] + list(re.finditer(r"after the generation\s*:\s*([\d.]+) MiB reserved", mem)))[-1]
    sampled = ([None] + list(re.finditer(r"sampled during the generation\s*:\s*([\d.]+) MiB reserved at most.*\((\d+) samples\)", mem)))[-1]
    if gen:
        t16 = torch.get("results", {}).get("f16", {})
        peak = f"{sampled.group(1)} MiB at most in {sampled.group(2)} samples" if sampled else "not sampled"
        # The last generation's (pages are sized before each generation's first reading, so its
        # sum is a bound unless a pool of larger pages still took over between readings).
        bounds = list(re.finditer(r"(peak bound from the pools' counters|pools' peaks seen, added up)\s*:\s*([\d.]+) MiB", mem))
        largest = re.search(r"largest allocation the pools served\s*:\s*([\d.]+) MiB", mem)
        bound = bounds[-1] if bounds else None
        if bound:
            what = "at most" if bound.group(1).startswith("peak bound") else "pools' peaks seen, added up (not a bound):"
            peak += (f", {what} {bound.group(2)} MiB by the pools' counters (largest allocation "
                     f"{largest.group(1) if largest else '-'} MiB)")
        print(f"Whole SD 1.5 generation in f16 (bench_memory, its last generation): {gen.group(1)} MiB reserved after it, {peak}; "
              f"PyTorch's f16 run (its peaks): {fmt(t16.get('max_allocated_mib'), ' MiB')} allocated, "
              f"{fmt(t16.get('max_reserved_mib'), ' MiB')} reserved.")
    ba = re.search(r"before -> after \(same run\):\n(.*)\n(.*)", parts.get("before-after", ""))
    if ba:
        print(f"burn's generic ops -> tgate's kernels (f16):\n{ba.group(1).strip()}\n{ba.group(2).strip()}")
    tests = re.findall(r"^test result: .*$", parts.get("tests", ""), re.M)
    print(f"wgpu reference tests on this GPU: {'; '.join(tests) if tests else '-'}")
    for name, code in re.findall(r"^== ([\w-]+): exit (\d+)", log, re.M):
        if code != "0":
            print(f"part {name} exited {code} (124: its time limit)")
    for line in re.findall(r"^(== [\w-]+: skipped.*|skipped for lack of time.*)$", log, re.M):
        print(line.lstrip("= "))


if __name__ == "__main__":
    main()
