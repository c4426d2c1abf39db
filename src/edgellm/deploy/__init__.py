"""Deployments across processes: the topology file that names the nodes, their links and the model split."""
