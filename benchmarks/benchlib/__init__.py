"""Shared pieces of the hbat benchmarks, one module per job:

    layouts    the tensor layouts (Llama-shaped, many small tensors) scaled to a size
    op_providers  the ops the benchmarks time (every op of the op table, and ewc_penalty), their inputs, and the
                  providers that compute them (hbat-<backend>, naive, foreach, fisher)
    timing     the benchmark clock, interleaved rounds, the streaming copy_ yardstick
    memory     peak memory above the inputs (GPU allocator; on the CPU the peak RSS of a fresh child process)
    report     the scripts' command lines, threads, machine line, CSV / markdown output and progress bars
"""
