"""Dev aid shared by the kernel timing scripts: microseconds per call of fn(i) from CUDA-graph replays,
the calls rotating over `sets` separately allocated inputs (so L2 serves none of them)."""
import statistics

import torch


def graph_us(fn, sets, calls=40):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3): fn(i % sets)
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls): fn(i % sets)
    for _ in range(3): g.replay()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1000 / calls)
    return statistics.median(ts)
