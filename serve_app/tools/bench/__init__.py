"""The side-by-side benchmarks: engine, frame loop, voices, server and cluster, each writing results/bench/."""
