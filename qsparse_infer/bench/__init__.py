"""Measurement: `e2e` (`qsparse bench`: decode tokens/s and achieved bandwidth against the streaming ceiling),
`profile` (`qsparse bench --profile`: time per kernel kind against its floor) and `torch_peer` (the torch bf16
gpt-fast-style peer). The kernel lab's scripts live in the repository's `bench/` folder."""
