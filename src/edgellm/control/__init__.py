"""The control plane's I/O shell: profile nodes and links, plan a topology, re-plan a running deployment."""
