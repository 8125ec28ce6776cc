"""Several machines: llama.cpp's RPC workers (README "Several machines").

`wire` asks a worker's ggml-rpc-server what llama-server would ask first (its version, its
devices' memory); `workers` is what the head does with that (reachability, each worker's
share of a model, the records status shows); `setup` writes a worker machine's socket
drop-in; `cli` is `hoshikage rpc-worker`.
"""
