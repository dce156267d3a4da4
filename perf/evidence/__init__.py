"""The stages of the time-boxed GPU benchmark job (perf/gpu_evidence.py runs them in order; perf/README.md
describes the job). Each stage is `run(job, ctx, clock) -> note` and writes its rows as it measures."""
