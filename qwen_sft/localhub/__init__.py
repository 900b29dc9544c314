"""A stand-in for the Hugging Face Hub on this machine: the three source datasets' repos in their real layouts,
filled with synthetic rows (`synthetic`, `replicas`), and a server of the hub API on 127.0.0.1 (`server`). The
tests and the benchmarks point HF_ENDPOINT at it; nothing here is used by the stages themselves.
"""
