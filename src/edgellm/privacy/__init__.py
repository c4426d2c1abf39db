"""Privacy of what leaves the device: differential privacy on smashed data and adapter updates (mechanisms, the
accountant, mods on links), and the attacks that measure what leaks (docs/PRIVACY.md)."""
