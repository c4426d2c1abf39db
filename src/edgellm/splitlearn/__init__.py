"""Split learning, both halves of one protocol: the device's model (servers as autograd functions) and a
server's training host (adapters, the shared adapter's turn, checkpoints, FedAvg rounds)."""
